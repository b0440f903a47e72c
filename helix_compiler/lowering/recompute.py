"""Lowering step: insert recompute instructions (activation checkpointing) before backwards.

Pure ``Schedule -> Schedule``. Policies (``ir.segment.POLICIES``):

* ``"none"``: nothing is recomputed.
* ``"without_attention"`` (HelixPipe, HELIXPIPE.md 3): ``R c m all`` before the backward of
  every non-attention segment; ``R c m pre`` before the backward of every attention segment
  (only the pre-function, e.g. the QKV projection, is rerun; attention keeps out + lse).
* ``"full"``: ``R c m all`` before the backward of every segment.
* ``"selective"``: ``R c m all`` before the backward of attention segments only.

The R goes right before the backward (``B``, or ``I`` for zero-bubble schedules), and before
the RECVs that wait for that backward's gradient, so the recomputation overlaps the wait. A
backward whose forward is the previous compute instruction of the rank (e.g. the head's
``F(H, m), B(H, m)``) gets no R: nothing was dropped in between.
"""

from __future__ import annotations

from ..errors import ScheduleError
from ..ir.schedule import Instr, Schedule
from ..ir.segment import POLICIES


def recompute_part(policy: str, seg_kind: str) -> str | None:
    """The ``R`` part for a segment of ``seg_kind`` under ``policy`` (None: no recompute)."""
    if policy not in POLICIES:
        raise ScheduleError(f"recompute policy {policy!r} is not one of {POLICIES}")
    if policy == "none":
        return None
    if policy == "full":
        return "all"
    if policy == "without_attention":
        return "pre" if seg_kind == "attn" else "all"
    return "all" if seg_kind == "attn" else None  # selective


def insert_recompute(schedule: Schedule, policy: str) -> Schedule:
    recompute_part(policy, "attn")  # validates the policy
    if any(i.op == "R" for p in schedule.programs for i in p):
        raise ScheduleError("insert_recompute: the schedule already has R instructions "
                            f"(lowered steps: {schedule.lowered})")
    programs = []
    for prog in schedule.programs:
        out: list[Instr] = []
        prev_compute: Instr | None = None
        for i in prog:
            if i.op in ("B", "I"):
                part = recompute_part(policy, schedule.spec(i.seg).kind)
                fresh = prev_compute is not None and prev_compute.op == "F" and (
                    prev_compute.seg == i.seg and prev_compute.mb == i.mb)
                if part is not None and not fresh:
                    k = len(out)
                    while k > 0 and out[k - 1].op == "RECV":
                        k -= 1
                    out.insert(k, Instr("R", i.seg, i.mb, part=part))
            out.append(i)
            if i.is_compute:
                prev_compute = i
        programs.append(out)
    return schedule.replace_programs(programs, "recompute", recompute=policy)
