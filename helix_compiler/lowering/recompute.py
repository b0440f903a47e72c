"""Lowering step: insert recompute instructions (activation checkpointing) before backwards.

Pure ``Schedule -> Schedule``. Which segments get an ``R`` and with which part is the
policy table's (``ir.recompute``: ``policy_for(policy, kind).part``): under ``"none"`` none;
``"without_attention"`` (HelixPipe, HELIXPIPE.md 3) ``R c m all`` before the backward of
every non-attention segment and ``R c m pre`` before the backward of every attention segment
(rerun with the attention replayed from its recorded out + lse); ``"full"`` ``R c m all``
everywhere; ``"selective"`` ``R c m all`` before attention segments only.

The R goes right before the backward (``B``, or ``I`` for zero-bubble schedules), and before
the RECVs that wait for that backward's gradient, so the recomputation overlaps the wait. A
backward whose forward is the previous compute instruction of the rank (e.g. the head's
``F(H, m), B(H, m)``) gets no R: nothing was dropped in between.
"""

from __future__ import annotations

from ..errors import ScheduleError
from ..ir.recompute import check_policy, recompute_part
from ..ir.schedule import Instr, Schedule


def insert_recompute(schedule: Schedule, policy: str) -> Schedule:
    check_policy(policy, error=ScheduleError)
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
