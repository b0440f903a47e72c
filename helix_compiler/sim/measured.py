"""A real run in the simulator's result type, so that one trace writer and one picture (the
same colour table) serve both: ``measured_result(...).write_timeline(path)`` and
``write_chrome_trace(measured_result(...), path)`` look like their simulated twins.

Input: per rank, the executor's trace (``Executor.trace``: the instruction and its
``perf_counter`` start and end), e.g. gathered to one rank or read back from JSON
(:func:`trace_to_json` / :func:`trace_from_json`). Ranks' clocks are the same machine's
monotonic clock on one host; across hosts each rank is aligned at its own first event.
"""

from __future__ import annotations

from ..ir.schedule import Instr, Schedule
from .engine import OpEvent, SimResult, _category


def trace_to_json(trace) -> list[dict]:
    return [{"instr": str(e.instr), "start": e.start, "end": e.end} for e in trace]


def trace_from_json(rows: list[dict]) -> list[tuple[Instr, float, float]]:
    return [(Instr.parse(r["instr"]), float(r["start"]), float(r["end"])) for r in rows]


def measured_result(schedule: Schedule, traces: list[list[tuple[Instr, float, float]]], *,
                    align_ranks: bool = False, title: str = "measured") -> SimResult:
    """``traces[r]``: rank r's compute instructions as ``(instr, start, end)`` in seconds."""
    if len(traces) != schedule.num_stages:
        raise ValueError(f"{len(traces)} traces for a schedule of {schedule.num_stages} ranks")
    starts = [min((s for _, s, _ in tr), default=0.0) for tr in traces]
    t0 = min(starts)
    events = []
    for r, tr in enumerate(traces):
        base = starts[r] if align_ranks else t0
        for instr, s, e in tr:
            if instr.is_compute:
                events.append(OpEvent(r, s - base, e - base, instr, _category(instr, schedule.spec(instr.seg).kind)))
    end = max((e.end for e in events), default=0.0)
    busy = [sum(e.end - e.start for e in events if e.rank == r) for r in range(schedule.num_stages)]
    return SimResult(schedule=schedule, iteration_time=end, busy=busy, events=events, messages=[],
                     memory_timeline=[[] for _ in traces], peak_stash_bytes=[0.0] * len(traces),
                     device_name=title, meta={"measured": True})
