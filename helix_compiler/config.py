"""User-facing configuration, validated on construction with actionable errors."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import HelixError
from .ir.schedule import SCHEDULE_KINDS as SCHEDULES
from .ir.segment import POLICIES


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise HelixError(f"{name}={value!r} must be a positive integer")


LOSS_REDUCTIONS = ("auto", "tokens", "micro_batch_mean")
RESERVED_INPUTS = ("input_ids", "labels")


def _check_inputs(inputs) -> None:
    if isinstance(inputs, str) or not isinstance(inputs, (tuple, list)) \
            or not all(isinstance(n, str) and n.isidentifier() for n in inputs):
        raise HelixError(f"inputs={inputs!r} must be a tuple of input names (identifiers), e.g. "
                         f"('position_ids',) or ('attention_mask',)")
    clash = [n for n in inputs if n in RESERVED_INPUTS]
    if clash or len(set(inputs)) != len(inputs):
        raise HelixError(f"inputs={tuple(inputs)!r}: list each extra input once and leave out "
                         f"{list(RESERVED_INPUTS)}, which every program takes")


@dataclass(frozen=True)
class HelixConfig:
    pp_size: int
    seq_len: int
    num_microbatches: int | None = None  # default: pp_size * num_folds
    num_folds: int = 2
    micro_batch_size: int = 1
    recompute: str = "without_attention"
    mlp_chunks: int | None = None
    schedule: str = "helix"
    virtual_stages: int | None = None  # interleaved 1F1B only
    # helix only: a stage, or "auto" (least loaded by the cost model); None: the default rule,
    # "auto" for an untied head of >= half a mean layer's parameters, else stage 0
    # (``lowering.placement.default_head_stage``, resolved when the program's schedule is built)
    head_stage: int | str | None = None
    loss_output: int | str | None = None  # the loss's position/key when the model returns several values
    # per-token model inputs beyond (input_ids, labels), e.g. ("position_ids",) for packed documents
    inputs: tuple[str, ...] = ()
    # "tokens": the step's loss is the mean over every counted token of the step (what a
    # single-process run of the whole batch computes); "micro_batch_mean": the mean of the
    # micro batches' losses; "auto": "tokens" for Hugging Face causal LMs, else "micro_batch_mean"
    loss_reduction: str = "auto"
    # lengths of the documents packed into one sequence (summing to seq_len), for the cost model
    # and simulator: attention costs the sum of squared document lengths, not seq_len squared
    document_lengths: tuple[int, ...] | None = None
    # ranks of the tensor-parallel group inside each stage (Megatron's layout, passes.tensor_parallel)
    tensor_parallel: int = 1
    # split the activations between the parallel regions along the sequence (Megatron's sequence
    # parallelism); None: on whenever tensor_parallel > 1
    sequence_parallel: bool | None = None
    # split the token embedding and the head by vocabulary rows (vocabulary-parallel
    # cross-entropy); None: on whenever tensor_parallel > 1
    vocab_parallel: bool | None = None

    def __post_init__(self) -> None:
        _positive_int("pp_size", self.pp_size)
        _positive_int("seq_len", self.seq_len)
        _positive_int("num_folds", self.num_folds)
        _positive_int("micro_batch_size", self.micro_batch_size)
        if self.seq_len < 2:
            raise HelixError(f"seq_len={self.seq_len} must be at least 2")
        if self.num_microbatches is None:
            object.__setattr__(self, "num_microbatches", self.pp_size * self.num_folds)
        _positive_int("num_microbatches", self.num_microbatches)
        if self.recompute not in POLICIES:
            raise HelixError(f"recompute={self.recompute!r} is not a policy; use one of {list(POLICIES)}")
        if self.schedule not in SCHEDULES and self.schedule != "auto":  # "auto": tune.py searches them
            raise HelixError(f"schedule={self.schedule!r} is not known; use one of {[*SCHEDULES, 'auto']}")
        if self.head_stage is not None and self.schedule != "helix":
            raise HelixError(f"head_stage={self.head_stage!r} applies to schedule='helix' only "
                             f"(got schedule={self.schedule!r}); leave it None")
        if self.head_stage is not None and self.head_stage != "auto" and (
                isinstance(self.head_stage, bool) or not isinstance(self.head_stage, int)
                or not 0 <= self.head_stage < self.pp_size):
            raise HelixError(f"head_stage={self.head_stage!r} must be 'auto' or a stage in 0..{self.pp_size - 1}")
        if self.mlp_chunks is not None:
            _positive_int("mlp_chunks", self.mlp_chunks)
            if self.mlp_chunks > self.seq_len:
                raise HelixError(
                    f"mlp_chunks={self.mlp_chunks} is larger than seq_len={self.seq_len}: each MLP chunk needs at "
                    f"least one token; use 1 <= mlp_chunks <= {self.seq_len} (e.g. seq_len/mlp_chunks of a few "
                    f"thousand tokens), or None")
        _positive_int("tensor_parallel", self.tensor_parallel)
        if self.sequence_parallel is None:
            object.__setattr__(self, "sequence_parallel", self.tensor_parallel > 1)
        if not isinstance(self.sequence_parallel, bool):
            raise HelixError(f"sequence_parallel={self.sequence_parallel!r} must be True, False or None")
        if self.vocab_parallel is None:
            object.__setattr__(self, "vocab_parallel", self.tensor_parallel > 1)
        if not isinstance(self.vocab_parallel, bool) or (self.vocab_parallel and self.tensor_parallel == 1):
            raise HelixError(f"vocab_parallel={self.vocab_parallel!r} must be True (with tensor_parallel > 1), "
                             f"False or None")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise HelixError("sequence_parallel=True needs tensor_parallel > 1 (it splits the sequence over the "
                             "tensor-parallel ranks)")
        if self.sequence_parallel and self.micro_batch_size != 1:
            raise HelixError(f"sequence parallelism needs micro_batch_size=1 (one sequence per micro batch: the "
                             f"[b*s, h] rows of a matmul are then the sequence); got micro_batch_size="
                             f"{self.micro_batch_size}: use micro_batch_size=1 or sequence_parallel=False")
        if self.sequence_parallel and self.seq_len % self.tensor_parallel:
            raise HelixError(f"seq_len={self.seq_len} must be a multiple of tensor_parallel={self.tensor_parallel} "
                             f"for sequence parallelism (each tp rank holds seq_len/tp tokens); use "
                             f"{self.seq_len // self.tensor_parallel * self.tensor_parallel or self.tensor_parallel}"
                             f" or sequence_parallel=False")
        if self.tensor_parallel > 1 and self.mlp_chunks not in (None, 1):
            raise HelixError(f"mlp_chunks={self.mlp_chunks} with tensor_parallel={self.tensor_parallel}: chunked MLPs "
                             f"are not split over tensor-parallel ranks yet; use mlp_chunks=None with tp > 1")
        if self.virtual_stages is not None:
            if self.schedule != "interleaved":
                raise HelixError(f"virtual_stages={self.virtual_stages!r} applies to schedule='interleaved' only "
                                 f"(got schedule={self.schedule!r}); leave it None")
            if isinstance(self.virtual_stages, bool) or not isinstance(self.virtual_stages, int) \
                    or self.virtual_stages < 2:
                raise HelixError(f"virtual_stages={self.virtual_stages!r} must be an int >= 2 (model chunks per "
                                 f"rank), or None to choose one")
        if self.loss_output is not None and (isinstance(self.loss_output, bool)
                                             or not isinstance(self.loss_output, (int, str))):
            raise HelixError(f"loss_output={self.loss_output!r} must be a position (int) or a key/attribute name "
                             f"(str) of the model's outputs, or None when the model returns the loss alone")
        _check_inputs(self.inputs)
        object.__setattr__(self, "inputs", tuple(self.inputs))
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise HelixError(f"loss_reduction={self.loss_reduction!r} is not known; use one of {list(LOSS_REDUCTIONS)}")
        if self.document_lengths is not None:
            docs = tuple(self.document_lengths)
            if not docs or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in docs) \
                    or sum(docs) != self.seq_len:
                raise HelixError(f"document_lengths={self.document_lengths!r} must be positive ints summing to "
                                 f"seq_len={self.seq_len} (the documents packed into one sequence), or None")
            object.__setattr__(self, "document_lengths", docs)
        M, p = self.num_microbatches, self.pp_size
        if self.schedule == "helix" and M % (p * self.num_folds):
            pf = p * self.num_folds
            below = M // pf * pf
            options = (below, below + pf) if below else (pf, 2 * pf)
            raise HelixError(
                f"num_microbatches={M} must be a multiple of pp_size*num_folds={pf} "
                f"for the helix schedule; use {options[0]} or {options[1]}")
        if self.schedule in ("1f1b", "zb1p", "interleaved") and M < p:
            raise HelixError(f"num_microbatches={M} must be >= pp_size={p} for schedule={self.schedule!r} (each "
                             f"stage keeps up to pp_size micro batches in flight); use num_microbatches >= {p}, "
                             f"or schedule='gpipe'")
        if self.schedule == "interleaved" and M % p:
            raise HelixError(f"num_microbatches={M} must be a multiple of pp_size={p} for schedule='interleaved' "
                             f"(micro batches go round in groups of pp_size); use {M // p * p} or {(M // p + 1) * p}")
