"""Peak memory per pipeline rank: activations + parameters + gradients + optimizer state.

The simulator (``sim.engine``) counts activations only (stashes, boundary buffers, gradients
of boundary values). A rank also holds, for the whole step, the parameters it owns, their
gradients and the optimizer's state. What a rank owns comes from the schedule's placement:
the parameters of every segment whose forward runs on it (as ``lowering.stage_program``
gives a rank's ``StageProgram.params``); a weight used by segments on two ranks (a tied
embedding and head on different stages) is held, stepped and counted on both. Weights
shipped to an attention stage (HelixPipe's transfer-weight) are activations there and are in
the simulator's figure already.

Bytes per parameter element (:data:`OPTIMIZERS`), counted exactly as stated:

* ``"adam_bf16"``: mixed precision Adam: bf16 parameter 2 + bf16 gradient 2 + fp32 master
  weight 4 + two fp32 moments 8 = 16 bytes;
* ``"adam_fp32"``: plain fp32 Adam: fp32 parameter 4 + fp32 gradient 4 + two fp32 moments 8
  = 16 bytes (no master copy);
* ``"auto"``: from the parameters' dtype: ``"adam_bf16"`` for 16-bit parameters, else Adam
  with gradient and moments in the parameters' own dtype (fp32: ``"adam_fp32"``; fp64: 32).

Scale-out (arguments ``tp``, ``dp``, ``dp_shard``):

* ``tp``: a parameter that ``passes.tensor_parallel_plan`` splits counts its shard (one tp
  rank's), a replicated one whole; parameters, gradients and optimizer state alike. The
  activation bytes per rank are ASSUMED to divide by ``tp`` (what Megatron's sequence
  parallelism gives: every activation, norms and dropout included, split over the tp
  ranks); the compiled tensor-parallel program's own costs will replace this assumption.
  A program compiled with ``tensor_parallel`` > 1 has per-rank activations already: they
  are not divided again.
* ``dp_shard=True`` (ZeRO-2 style): optimizer state and gradients divide by ``dp``;
  parameters stay whole. ``dp_shard="optimizer"`` (ZeRO-1, what ``runtime.zero``'s
  ``sharded_optimizer`` does): the optimizer state only. Without it ``dp`` changes nothing
  per rank (plain replicas).

Not counted: kernel workspaces, the allocator's fragmentation, communication buffers of the
tp/dp collectives, the transient logits of the loss head beyond what the cost model saves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import HelixError


@dataclass(frozen=True)
class OptimizerBytes:
    """Bytes per parameter element a rank keeps for training (see the module docstring)."""

    name: str
    parameter: float
    gradient: float
    state: float  # master weights + moments

    @property
    def total(self) -> float:
        return self.parameter + self.gradient + self.state


OPTIMIZERS = {
    "adam_bf16": OptimizerBytes("adam_bf16", parameter=2, gradient=2, state=4 + 4 + 4),
    "adam_fp32": OptimizerBytes("adam_fp32", parameter=4, gradient=4, state=4 + 4),
}


def optimizer_bytes(optimizer: str | OptimizerBytes, param_dtype: torch.dtype = torch.float32) -> OptimizerBytes:
    """The :class:`OptimizerBytes` for a name in :data:`OPTIMIZERS`, ``"auto"`` (from
    ``param_dtype``), or an :class:`OptimizerBytes` given as is."""
    if isinstance(optimizer, OptimizerBytes):
        return optimizer
    if optimizer == "auto":
        if param_dtype in (torch.bfloat16, torch.float16):
            return OPTIMIZERS["adam_bf16"]
        e = torch.empty((), dtype=param_dtype).element_size()
        return OptimizerBytes(f"adam_{str(param_dtype).removeprefix('torch.')}", e, e, 2 * e)
    if optimizer not in OPTIMIZERS:
        raise HelixError(f"optimizer={optimizer!r} is not known; use 'auto', one of {sorted(OPTIMIZERS)}, or an "
                         f"OptimizerBytes(name, parameter, gradient, state) with bytes per parameter element")
    return OPTIMIZERS[optimizer]


@dataclass(frozen=True)
class RankMemory:
    """One pipeline rank's peak, in bytes: the activation peak plus what the rank holds all step."""

    activations: float
    parameters: float
    gradients: float
    optimizer: float

    @property
    def static(self) -> float:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.activations + self.static

    def describe(self) -> str:
        gb = 1e9
        return (f"{self.total / gb:.3f} GB (activations {self.activations / gb:.3f} + parameters "
                f"{self.parameters / gb:.3f} + gradients {self.gradients / gb:.3f} + optimizer state "
                f"{self.optimizer / gb:.3f})")


def _check_scale(tp, dp, dp_shard=False) -> None:
    for name, v in (("tp", tp), ("dp", dp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise HelixError(f"{name}={v!r} must be a positive integer")
    if dp_shard not in (False, True, "optimizer"):
        raise HelixError(f"dp_shard={dp_shard!r}: use False, True (optimizer state and gradients over dp, ZeRO-2) "
                         f"or 'optimizer' (optimizer state only, ZeRO-1)")


class MemoryModel:
    """Per-segment parameter elements of a compiled program, for fast per-schedule figures
    (the schedule search asks it once per candidate)."""

    def __init__(self, program, *, tp: int = 1, dp: int = 1, dp_shard: bool = False,
                 optimizer: str | OptimizerBytes = "auto"):
        _check_scale(tp, dp, dp_shard)
        compiled_tp = int(getattr(program.config, "tensor_parallel", 1) or 1)
        if compiled_tp > 1 and tp not in (1, compiled_tp):
            raise HelixError(f"tp={tp} but the program was compiled with tensor_parallel={compiled_tp}; pass "
                             f"tp={compiled_tp} (or leave tp=1)")
        self.tp = max(tp, compiled_tp)
        # activations of a tp=1 program are divided by tp (the module docstring's assumption)
        self.activation_divisor = 1 if compiled_tp > 1 else self.tp
        self.dp, self.dp_shard = dp, dp_shard
        captured = program.captured
        params = dict(captured.module.named_parameters())  # first name of each parameter object
        canonical = {id(p): n for n, p in params.items()}
        gm = captured.gm
        dtypes = {p.dtype for p in params.values()}
        self.optimizer = optimizer_bytes(optimizer, max(dtypes, key=lambda d: torch.empty((), dtype=d).element_size())
                                         if dtypes else torch.float32)
        shard = {}
        if self.tp > 1:
            plan = program.tensor_parallel_plan(self.tp)
            shard = {p.name: _numel(p.shard) for p in plan.params}
        fqn = captured.user_fqn
        self.numel = {n: shard.get(fqn(n), p.numel()) for n, p in params.items()}
        self.segment_params = {s.name: frozenset(canonical[id(gm.get_parameter(p))] for p in s.params)
                               for s in program.segments}

    @classmethod
    def from_segments(cls, segment_params: dict[str, frozenset[str]], numel: dict[str, int], *,
                      optimizer: str | OptimizerBytes = "adam_bf16", dp: int = 1,
                      dp_shard: bool = False) -> MemoryModel:
        """A model without a compiled program: ``segment_params[segment name]`` the parameter
        names a segment uses (a name in two segments is one tensor, held once per rank),
        ``numel`` their elements on one tp rank; activations are taken as given (per tp rank)."""
        _check_scale(1, dp, dp_shard)
        self = cls.__new__(cls)
        self.tp, self.activation_divisor, self.dp, self.dp_shard = 1, 1, dp, dp_shard
        self.optimizer = optimizer_bytes(optimizer)
        self.numel = dict(numel)
        self.segment_params = {k: frozenset(v) for k, v in segment_params.items()}
        return self

    def owned(self, schedule) -> list[frozenset[str]]:
        """Per rank: canonical names of the parameters it holds (those of every segment it runs
        a forward of)."""
        out = []
        for prog in schedule.programs:
            segs = {i.seg for i in prog if i.op == "F"}
            out.append(frozenset().union(*(self.segment_params.get(s, frozenset()) for s in segs)))
        return out

    def per_rank(self, schedule, activation_peaks: Sequence[float], *,
                 per_tp_rank: bool = False) -> list[RankMemory]:
        """:class:`RankMemory` of every rank, given the simulator's activation peaks (of the
        whole stage, divided by tp here; ``per_tp_rank``: already one tp rank's)."""
        if len(activation_peaks) != schedule.num_stages:
            raise HelixError(f"{len(activation_peaks)} activation peaks for {schedule.num_stages} ranks")
        o = self.optimizer
        state_shard = self.dp if self.dp_shard else 1
        grad_shard = self.dp if self.dp_shard is True else 1
        out = []
        for names, act in zip(self.owned(schedule), activation_peaks, strict=True):
            n = sum(self.numel[x] for x in names)
            div = 1 if per_tp_rank else self.activation_divisor
            out.append(RankMemory(activations=act / div, parameters=n * o.parameter,
                                  gradients=n * o.gradient / grad_shard, optimizer=n * o.state / state_shard))
        return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def with_memory(program, result, *, tp: int = 1, dp: int = 1, dp_shard: bool = False,
                optimizer: str | OptimizerBytes = "auto"):
    """``result`` (a ``SimResult`` of ``program``'s schedule) with every rank's
    :class:`RankMemory` attached (see :func:`attach_memory`)."""
    model = MemoryModel(program, tp=tp, dp=dp, dp_shard=dp_shard, optimizer=optimizer)
    return attach_memory(result, model.per_rank(result.schedule, result.peak_memory_bytes), tp=tp, dp=dp,
                         dp_shard=dp_shard, optimizer=model.optimizer.name)


def attach_memory(result, memory: Sequence[RankMemory], *, tp: int = 1, dp: int = 1, dp_shard: bool = False,
                  optimizer: str = "") -> object:
    """Store ``memory`` in ``result.meta`` (``SimResult.rank_memory`` and
    ``SimResult.total_peak_memory_bytes`` read it) and return ``result``."""
    result.meta.update(rank_memory=list(memory), memory_scale=dict(tp=tp, dp=dp, dp_shard=dp_shard),
                       optimizer=optimizer)
    return result
