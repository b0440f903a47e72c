"""Lowering step: free every buffer right after its last use on its rank.

Pure ``Schedule -> Schedule``. Buffers per rank:

* ``stash c m``: what ``F(c, m)`` saved for the backward; last used by ``B(c, m)`` (zero-bubble
  schedules: ``W(c, m)``).
* ``fwd c m``: the output of segment c for micro batch m held on this rank (produced here or
  received); used by ``SEND fwd`` and by ``F(c+1, m)``.
* ``bwd c m``: the gradient of that output (produced by the backward of ``c+1`` or received);
  used by ``SEND bwd`` and by the backward of c.

A ``FREE`` follows the buffer's last reference. For a buffer that was sent, the runtime (and
the simulator) release it once that asynchronous send has completed.
"""

from __future__ import annotations

from ..errors import ScheduleError
from ..ir.schedule import Instr, Schedule

_ORDER = {"fwd": 0, "bwd": 1, "stash": 2}


def buffer_refs(i: Instr, idx: dict[str, int], names: list[str]) -> list[tuple[str, str, int]]:
    """The buffers ``(value, segment, mb)`` an instruction touches."""
    last = len(names) - 1
    if i.op == "F":
        c = idx[i.seg]
        refs = [("stash", i.seg, i.mb)]
        if c > 0:
            refs.append(("fwd", names[c - 1], i.mb))
        if c < last:
            refs.append(("fwd", i.seg, i.mb))
        return refs
    if i.op in ("B", "I"):
        c = idx[i.seg]
        refs = [("stash", i.seg, i.mb)]
        if c < last:
            refs.append(("bwd", i.seg, i.mb))
        if c > 0:
            refs.append(("bwd", names[c - 1], i.mb))
        return refs
    if i.op in ("W", "R"):
        return [("stash", i.seg, i.mb)]
    if i.op in ("SEND", "RECV"):
        return [(i.value, i.seg, i.mb)]
    return []


def insert_frees(schedule: Schedule) -> Schedule:
    if any(i.op == "FREE" for p in schedule.programs for i in p):
        raise ScheduleError("insert_frees: the schedule already has FREE instructions "
                            f"(lowered steps: {schedule.lowered})")
    idx = schedule.seg_index
    names = [s.name for s in schedule.specs]
    programs = []
    for prog in schedule.programs:
        ins = prog.instrs
        last_use: dict[tuple[str, str, int], int] = {}
        for j, i in enumerate(ins):
            for key in buffer_refs(i, idx, names):
                last_use[key] = j
        # a rank only holds fwd/bwd buffers it produced or received: drop refs of a
        # consumer-side key the rank never had (cannot happen in a valid schedule, where
        # the validator checks every input exists), so no special case is needed here
        frees_at: dict[int, list[tuple[str, str, int]]] = {}
        for key, j in last_use.items():
            frees_at.setdefault(j, []).append(key)
        out: list[Instr] = []
        for j, i in enumerate(ins):
            out.append(i)
            for value, seg, mb in sorted(frees_at.get(j, ()), key=lambda k: (_ORDER[k[0]], k[1])):
                out.append(Instr("FREE", seg, mb, value=value))
        programs.append(out)
    return schedule.replace_programs(programs, "frees")
