"""The compiler's last product: one frozen :class:`StageProgram` per pipeline rank.

A stage program is everything a rank needs to run its part of a step, with nothing left to
work out at run time: the rank's instructions (lowered: communication, recompute and frees
inserted), the segment GraphModules it runs (already rewritten for run time: attention
record/replay, MLP chunking, an eval twin without dropout), the concrete shape and dtype of
every message it receives, the parameters it owns under the user's names, and where its
program splits into the forward half (``pipe(...)``) and the backward half
(``loss.backward()``). The runtime imports this module, ``ir.schedule`` and ``kernels``;
never ``program``, ``passes`` or sympy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .owned_state import OwnedState
from .schedule import Instr
from .tensor_parallel import Sharded

Spec = tuple[tuple[int, ...], torch.dtype]


@dataclass(frozen=True)
class StageSegment:
    """One segment as a rank runs it: ``gm(*chain_inputs, *user_inputs) -> chain outputs``."""

    name: str
    kind: str  # ir.segment.KINDS
    gm: fx.GraphModule  # training graph (dropout on)
    eval_gm: fx.GraphModule  # the same graph with dropout removed (``pipe.eval()``)
    user_inputs: tuple[str, ...]  # model inputs it reads ("input_ids", "labels")
    output_specs: tuple[Spec, ...]  # concrete (shape, dtype) of each chain output
    uses_rng: bool  # has random ops (dropout): its RNG state is replayed for recomputation


@dataclass(frozen=True)
class SharedParam:
    """A parameter used on several ranks (a tied embedding and head on different stages):
    its gradient is summed over the ranks each step, and it must start equal on them."""

    holders: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class TokenCount:
    """The number of counted tokens of one micro batch, as the model's loss counts them:
    ``count(*inputs) -> target`` (the loss's target computed from the user inputs); a token
    counts where ``target != ignore_index`` (``passes.token_loss`` extracts it)."""

    gm: fx.GraphModule
    inputs: tuple[str, ...]  # user inputs it reads, in placeholder order
    ignore_index: int

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        target = self.gm(*(batch[n] for n in self.inputs))
        return (target != self.ignore_index).sum()


@dataclass(frozen=True)
class StageProgram:
    rank: int
    num_ranks: int
    kind: str  # schedule kind
    recompute: str  # recompute policy
    instrs: tuple[Instr, ...]  # the full step
    forward_only: tuple[Instr, ...]  # the step without backward (evaluation under no_grad)
    split: int  # index of the first backward-half instruction (== len(instrs) for 1F1B-like)
    forward_first: bool  # every rank's program splits into a forward and a backward half
    chain: tuple[str, ...]  # segment names in chain order (E, A1, P1, ..., H)
    segments: Mapping[str, StageSegment]  # the segments this rank runs
    recv_specs: Mapping[tuple[str, str], tuple[Spec, ...]]  # (value, segment) -> message specs
    params: Mapping[str, torch.nn.Parameter]  # owned parameters, by the user's names
    shared: Mapping[str, SharedParam]  # every parameter used on several ranks (the same on all ranks)
    head_rank: int  # the rank whose head segment gives the loss
    preview_loss: bool  # the head runs in the backward half: forward() previews the loss
    num_microbatches: int
    micro_batch_size: int
    seq_len: int
    input_names: tuple[str, ...]  # what ``pipe(...)`` takes, in order
    vocab_size: int | None  # token ids must lie in [0, vocab_size)
    ignore_index: int  # the one label value outside [0, vocab_size) that is allowed
    fingerprint: str  # identical on every rank of one compiled program
    # None: the step's loss is the mean of the micro batches' losses; else the head returns
    # token sums and the step divides by the step's counted tokens
    token_count: TokenCount | None = None
    document_inputs: tuple[str, ...] = ()  # per-token document ids the attention masks by
    padding_inputs: tuple[str, ...] = ()  # right-padding masks the attention masks by
    owned_state: OwnedState = OwnedState()  # buffers, tied names, the full model's keys (ir.owned_state)
    # tensor parallelism inside the stage: this program is tp rank ``tp_rank`` of ``tp_size``;
    # its split parameters (by the user's names) hold the shard ``tp_shards[name]`` says; the
    # graphs' collectives name their process group by ``tp_group_key``
    tp_size: int = 1
    tp_rank: int = 0
    tp_group_key: str | None = None
    tp_shards: Mapping[str, Sharded] = field(default_factory=dict)
    # owned parameters held whole whose gradient each tp rank computes a part of (summed over tp)
    tp_partial_grads: tuple[str, ...] = ()

    @property
    def head(self) -> str:
        return self.chain[-1]

    @property
    def final(self) -> str:
        return self.chain[-2]

    def pred(self, seg: str) -> str | None:
        """The chain predecessor of ``seg`` (None for the embedding)."""
        k = self.chain.index(seg)
        return self.chain[k - 1] if k > 0 else None

    def __str__(self) -> str:
        lines = [f"StageProgram rank {self.rank}/{self.num_ranks} ({self.kind}, recompute={self.recompute}): "
                 f"{len(self.instrs)} instructions, split at {self.split}, segments "
                 f"{', '.join(self.segments)}; owns {len(self.params)} parameters"]
        lines += [f"  {i}" for i in self.instrs]
        return "\n".join(lines)
