"""Layer-wise baseline schedules on the same segment chain: GPipe, 1F1B, interleaved 1F1B, ZB1P.

Every (virtual) stage owns contiguous layers (``placement.layerwise_placement``): ``A(l)`` and
``P(l)`` on the stage owning layer l, ``E`` with layer 1, ``H`` right after ``PL`` on the last
stage. A stage's forward of micro batch m runs the forward of its segments in chain order; its
backward runs their backward in reverse (the head first on the last stage). The per-rank
orders follow ``torch.distributed.pipelining`` (``ScheduleGPipe``, ``Schedule1F1B``,
``ScheduleInterleaved1F1B``, and ``ScheduleInterleavedZeroBubble`` with one local stage,
which is ZB1P / ZB-H1 of Qi et al.).
"""

from __future__ import annotations

from collections import defaultdict, deque

from ..errors import ScheduleError
from ..ir.schedule import Instr, RankProgram, Schedule
from ..ir.segment import chain_specs
from .placement import Placement, layerwise_placement


class _Units:
    """Expands (virtual stage, micro batch) work items into segment instructions."""

    def __init__(self, placement: Placement):
        self.names = [s.name for s in chain_specs(placement.num_layers)]
        self.segs: dict[int, list[int]] = defaultdict(list)
        for c, j in enumerate(placement.chunk):
            self.segs[j].append(c)

    def fwd(self, chunk: int, mb: int) -> list[Instr]:
        return [Instr("F", self.names[c], mb) for c in self.segs[chunk]]

    def bwd(self, chunk: int, mb: int, op: str = "B") -> list[Instr]:
        return [Instr(op, self.names[c], mb) for c in reversed(self.segs[chunk])]


def _need_m_ge_p(kind: str, M: int, p: int) -> None:
    if M < p:
        raise ScheduleError(
            f"{kind}: num_microbatches={M} must be >= num_stages={p} (each stage keeps up to "
            f"p - rank micro batches in flight); use num_microbatches >= {p}, or kind='gpipe'")


def _schedule(kind: str, pl: Placement, progs: list[list[Instr]], **kw) -> Schedule:
    return Schedule(kind, pl.num_stages, pl.num_microbatches, 1, pl.num_layers,
                    tuple(RankProgram(r, tuple(p)) for r, p in enumerate(progs)), **kw)


def gpipe_schedule(num_layers: int, num_stages: int, num_microbatches: int) -> Schedule:
    """All forwards (micro batches in order), then all backwards (in order), per rank."""
    pl = layerwise_placement(num_layers, num_stages, num_microbatches, kind="gpipe")
    u = _Units(pl)
    M = num_microbatches
    progs = [[i for m in range(M) for i in u.fwd(r, m)] + [i for m in range(M) for i in u.bwd(r, m)]
             for r in range(num_stages)]
    return _schedule("gpipe", pl, progs)


def one_f_one_b_schedule(num_layers: int, num_stages: int, num_microbatches: int) -> Schedule:
    """1F1B: rank r runs ``p-1-r`` warm-up forwards, then alternates F/B, then cools down."""
    p, M = num_stages, num_microbatches
    _need_m_ge_p("1f1b", M, p)
    pl = layerwise_placement(num_layers, p, M, kind="1f1b")
    u = _Units(pl)
    progs = []
    for r in range(p):
        w = min(p - 1 - r, M)
        ops = [i for m in range(w) for i in u.fwd(r, m)]
        for k in range(M - w):
            ops += u.fwd(r, w + k) + u.bwd(r, k)
        for m in range(M - w, M):
            ops += u.bwd(r, m)
        progs.append(ops)
    return _schedule("1f1b", pl, progs)


def zb1p_schedule(num_layers: int, num_stages: int, num_microbatches: int) -> Schedule:
    """ZB1P (ZB-H1): 1F1B with the backward split into input-gradient ``I`` (on the critical
    path) and weight-gradient ``W``; rank r keeps r weight gradients pending in the steady
    phase, which fills the cool-down bubble (as ``ScheduleInterleavedZeroBubble`` with one
    local stage)."""
    p, M = num_stages, num_microbatches
    _need_m_ge_p("zb1p", M, p)
    pl = layerwise_placement(num_layers, p, M, kind="zb1p")
    u = _Units(pl)
    progs = []
    for r in range(p):
        w = min(p - 1 - r, M)
        ops = [i for m in range(w) for i in u.fwd(r, m)]
        pending: deque[int] = deque()
        for k in range(M):  # steady: F(w+k) then I(k); cool-down: I(k) only
            if k < M - w:
                ops += u.fwd(r, w + k)
            ops += u.bwd(r, k, "I")
            pending.append(k)
            if k >= r:  # rank r keeps r weight gradients pending
                ops += u.bwd(r, pending.popleft(), "W")
        while pending:
            ops += u.bwd(r, pending.popleft(), "W")
        progs.append(ops)
    return _schedule("zb1p", pl, progs)


def valid_virtual_stages(num_layers: int, num_stages: int) -> list[int]:
    if num_layers % num_stages:
        return []
    per = num_layers // num_stages
    return [v for v in range(2, per + 1) if per % v == 0]


def interleaved_schedule(num_layers: int, num_stages: int, num_microbatches: int,
                         virtual_stages: int | None = None) -> Schedule:
    """Interleaved 1F1B (Narayanan et al.; Megatron / ``ScheduleInterleaved1F1B``): each rank
    holds ``v`` model chunks of ``L / (p v)`` layers; chunk c of the ``p v`` virtual stages
    lives on rank ``c mod p``."""
    p, M, L = num_stages, num_microbatches, num_layers
    valid = valid_virtual_stages(L, p)
    v = virtual_stages
    if v is None:
        v = valid[0] if valid else 2
    if v not in valid:
        if L % p:
            raise ScheduleError(
                f"interleaved: num_layers={L} must be a multiple of num_stages={p} "
                f"(each rank gets v chunks of equal size); use num_layers in "
                f"{[L // p * p, (L // p + 1) * p]} or kind='1f1b'")
        raise ScheduleError(
            f"interleaved: virtual_stages={virtual_stages} must be >= 2 and divide the layers "
            f"per rank num_layers/num_stages={L}/{p}={L // p}; valid virtual_stages: "
            f"{valid if valid else 'none (a rank holds one layer: use kind=1f1b)'}")
    _need_m_ge_p("interleaved", M, p)
    if M % p:
        raise ScheduleError(
            f"interleaved: num_microbatches={M} must be a multiple of num_stages={p} "
            f"(micro batches go round in groups of p); use {M // p * p} or {(M // p + 1) * p}")
    pl = layerwise_placement(L, p, M, virtual_stages=v, kind="interleaved")
    u = _Units(pl)
    per_round = p
    progs = []
    for r in range(p):
        warmup = min((v - 1) * per_round + 2 * (p - 1 - r), M * v)
        fwd_bwd = M * v - warmup
        total = warmup + fwd_bwd + warmup

        fcount: dict[int, int] = defaultdict(int)
        bcount: dict[int, int] = defaultdict(int)
        ops: list[Instr] = []
        for step in range(total):
            if step < warmup + fwd_bwd:
                c = ((step // per_round) % v) * p + r
                ops += u.fwd(c, fcount[c])
                fcount[c] += 1
            if step >= warmup:
                c = (v - 1 - ((step - warmup) // per_round) % v) * p + r
                ops += u.bwd(c, bcount[c])
                bcount[c] += 1
        progs.append(ops)
    return _schedule("interleaved", pl, progs, virtual_stages=v)
