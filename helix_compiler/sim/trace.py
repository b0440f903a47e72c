"""Chrome trace JSON (chrome://tracing, https://ui.perfetto.dev) of a simulated iteration.

One process ("pipeline"), per rank a compute thread (tid ``2r``) with one complete event
(``ph: "X"``) per compute instruction, a communication thread (tid ``2r+1``) with one event
per outgoing message (link occupancy plus latency, arrival in ``args``), flow arrows from each
send to its receiver, and a counter track of the rank's activation memory. Times in us.
"""

from __future__ import annotations

import json
from pathlib import Path

US = 1e6


def chrome_trace(res) -> dict:
    ev: list[dict] = [{"ph": "M", "pid": 0, "name": "process_name",
                       "args": {"name": f"{res.schedule.kind} pipeline"}}]
    for r in range(res.num_stages):
        ev.append({"ph": "M", "pid": 0, "tid": 2 * r, "name": "thread_name",
                   "args": {"name": f"rank {r} compute"}})
        ev.append({"ph": "M", "pid": 0, "tid": 2 * r + 1, "name": "thread_name",
                   "args": {"name": f"rank {r} send"}})
        ev.append({"ph": "M", "pid": 0, "tid": 2 * r, "name": "thread_sort_index",
                   "args": {"sort_index": 2 * r}})
    for e in res.events:
        ev.append({"ph": "X", "pid": 0, "tid": 2 * e.rank, "name": e.instr.short(),
                   "cat": e.category, "ts": e.start * US, "dur": (e.end - e.start) * US,
                   "args": {"instr": str(e.instr), "mb": e.instr.mb}})
    for k, m in enumerate(res.messages):
        ev.append({"ph": "X", "pid": 0, "tid": 2 * m.src + 1, "name": str(m.instr),
                   "cat": "comm", "ts": m.start * US, "dur": max(m.arrival - m.start, 0.0) * US,
                   "args": {"bytes": m.nbytes, "dst": m.dst, "issued_us": m.send_time * US,
                            "arrival_us": m.arrival * US}})
        ev.append({"ph": "s", "pid": 0, "tid": 2 * m.src + 1, "id": k, "name": "msg",
                   "cat": "comm", "ts": m.start * US})
        ev.append({"ph": "f", "pid": 0, "tid": 2 * m.dst, "id": k, "name": "msg",
                   "cat": "comm", "ts": m.arrival * US, "bp": "e"})
    for r, tl in enumerate(res.memory_timeline):
        for t, b in tl:
            ev.append({"ph": "C", "pid": 0, "name": f"activations rank {r} (GB)", "ts": t * US,
                       "args": {"GB": b / 1e9}})
    return {"traceEvents": ev, "displayTimeUnit": "ms",
            "otherData": {"iteration_time_s": res.iteration_time,
                          "bubble_ratio": res.bubble_ratio, "schedule": res.schedule.header()}}


def write_chrome_trace(res, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(chrome_trace(res)))
    return Path(path)
