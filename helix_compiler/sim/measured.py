"""A real run in the simulator's terms.

* :func:`measured_result`: a run in the simulator's result type, so that one trace writer and
  one picture (the same colour table) serve both: ``measured_result(...).write_timeline(path)``
  and ``write_chrome_trace(measured_result(...), path)`` look like their simulated twins.
* :func:`instruction_samples` and :func:`measured_op_times`: the simulator fed with the
  instruction times a run measured (the "measured profile"), to predict that machine's step
  time and memory for the same program.

Input: per rank, the executor's trace (``Executor.trace``: the instruction and its
``perf_counter`` start and end), e.g. gathered to one rank or read back from JSON
(:func:`trace_to_json` / :func:`trace_from_json`). Ranks' clocks are the same machine's
monotonic clock on one host; across hosts each rank is aligned at its own first event.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable, Mapping, Sequence

from ..cost.devices import get_device
from ..ir.schedule import Instr, Schedule
from .costs import OpTimes, op_times
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


def instruction_samples(trace: Iterable[tuple[Instr, float, float]],
                        previews: Iterable[tuple[float, float]] = ()) -> dict[str, list[float]]:
    """Durations of a run's instructions, keyed ``"op segment"`` (``"F A3"``, ``"RECV P2"``),
    from ``(instr, start, end)`` triples (``Executor.trace``, a hook's records); the loss
    previews (``Executor.preview_times.values()``) are taken out of the instruction they ran
    in (a forward, or a RECV on the head's rank) and kept under ``"preview"``."""
    previews = list(previews)
    out: dict[str, list[float]] = {"preview": [p1 - p0 for p0, p1 in previews]}
    for ev in trace:
        instr, s0, s1 = (ev.instr, ev.start, ev.end) if hasattr(ev, "instr") else ev
        nested = sum(p1 - p0 for p0, p1 in previews if s0 <= p0 and p1 <= s1)
        out.setdefault(f"{instr.op} {instr.seg}", []).append(s1 - s0 - nested)
    return out


def measured_op_times(program, samples: Mapping[str, Sequence[float]]) -> OpTimes:
    """:class:`OpTimes` of ``program`` (a ``HelixProgram``) with the durations a run measured:
    per (op, segment) the median of ``samples`` (:func:`instruction_samples`, pooled over ranks
    and steps), the loss preview folded into the final segment's forward (the instruction
    that delivers the hidden state it reads); backward halves for I/W. Bytes (stash,
    recompute, messages) are the cost model's at the program's micro batch size and
    sequence length, so the result predicts time and memory."""
    cfg = program.config
    # any device: only the byte fields of its op_times are kept
    bytes_ = op_times(program.costs, get_device("H20"), micro_batch_size=cfg.micro_batch_size,
                      seq_len=cfg.seq_len, recompute=cfg.recompute, specs=program.specs)

    def med(key: str) -> float:
        v = samples.get(key)
        return statistics.median(v) if v else 0.0

    names = [sp.name for sp in program.specs]
    fwd = [med(f"F {n}") for n in names]
    fwd[-2] += med("preview")
    bwd = tuple(med(f"B {n}") for n in names)
    return dataclasses.replace(bytes_, fwd=tuple(fwd), bwd=bwd, bwd_input=tuple(b / 2 for b in bwd),
                               bwd_weight=tuple(b / 2 for b in bwd),
                               recompute=tuple(med(f"R {n}") for n in names))
