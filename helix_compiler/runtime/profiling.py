"""Memory of a real run, from torch's allocator events.

Run a step under ``torch.profiler.profile(profile_memory=True)``; the executor wraps every
instruction in ``record_function(str(instr))``, so the allocator's events can be attributed
to instructions. :func:`instruction_memory` gives the live bytes after each instruction,
relative to the start of the profile: what the schedule says a rank holds between
instructions (stashes, boundary buffers, messages in flight), without the transients inside
one instruction's computation.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from ..errors import ScheduleError
from ..ir.schedule import Instr


@dataclass(frozen=True)
class InstrMemory:
    instr: Instr
    end_ns: int
    live_bytes: int  # allocated bytes after the instruction, relative to the profile start


def instruction_memory(prof) -> list[InstrMemory]:
    """Live CPU/GPU allocator bytes after each instruction recorded in ``prof`` (a finished
    ``torch.profiler.profile(profile_memory=True)``), in time order."""
    events = list(prof.profiler.kineto_results.events())
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    times = [t for t, _ in mem]
    cum, total = [], 0
    for _, n in mem:
        total += n
        cum.append(total)
    out = []
    for e in events:
        name = e.name()
        if name == "[memory]" or name.split(" ", 1)[0] not in ("F", "B", "R", "SEND", "RECV", "FREE"):
            continue
        try:
            instr = Instr.parse(name)
        except (ScheduleError, ValueError):
            continue
        end = e.start_ns() + e.duration_ns()
        k = bisect.bisect_right(times, end)
        out.append(InstrMemory(instr, end, cum[k - 1] if k else 0))
    return sorted(out, key=lambda m: m.end_ns)
