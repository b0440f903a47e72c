"""Memory is what the schedule says: a real run's memory after every instruction, from torch's
allocator events, against the simulator's for the same program fed with the instruction times
this run measured (``sim.measured.measured_op_times``: the simulator's "measured profile");
and nothing the schedule frees is still held at the end of a step."""

from __future__ import annotations

import statistics

import pytest
import torch

pytestmark = [pytest.mark.multiprocess]

SEQ, M = 256, 4
CASES = [("llama", "none"), ("llama", "without_attention"), ("llama", "full"), ("gpt", "without_attention")]


def _worker(rank: int, name: str, policy: str) -> dict:
    from models_for_tests import build

    from helix_compiler import helix_compile
    from helix_compiler.runtime.profiling import instruction_memory
    from helix_compiler.sim.engine import simulate_times
    from helix_compiler.sim.measured import instruction_samples, measured_op_times

    model, loss_fn = build(name, num_layers=4)
    pipe = helix_compile(model.float(), 2, SEQ, num_microbatches=M, recompute=policy, loss_fn=loss_fn,
                         timeout=30, record_trace=True)
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 256, (M, SEQ), generator=g), torch.randint(0, 256, (M, SEQ), generator=g)
    pipe(ids, labels).backward()  # the first step allocates the parameters' gradients
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        pipe(ids, labels).backward()
    mem = instruction_memory(prof)
    # the simulator with this step's instruction times, pooled over both ranks
    samples: dict[str, list[float]] = {}
    for part in pipe.transport.gather_all_objects(
            instruction_samples(pipe.executor.trace, pipe.executor.preview_times.values())):
        for k, v in part.items():
            samples.setdefault(k, []).extend(v)
    sim = simulate_times(pipe.program.schedule, measured_op_times(pipe.program, samples),
                         link=lambda src, dst: (float("inf"), 0.0))
    return dict(measured=[m.live_bytes for m in mem], seen=[str(m.instr) for m in mem],
                program=[str(i) for i in pipe.stage.instrs], predicted=sim.memory_after[rank],
                held=pipe.executor.live_bytes(), inflight=pipe.transport.inflight_send_bytes())


@pytest.mark.parametrize("name, policy", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_measured_memory_matches_the_simulator_instruction_by_instruction(name, policy):
    from helix_compiler.runtime.launch import spawn_ranks

    for rank, r in enumerate(spawn_ranks(_worker, 2, name, policy, timeout=180)):
        assert r["seen"] == r["program"], rank  # the profiler saw every instruction, in program order
        assert r["held"] == 0 and r["inflight"] == 0, r  # the step released every buffer it made
        meas, pred = r["measured"], r["predicted"]
        peak = max(pred)
        # the bound: the per-rank peak within 10% (measured here: 1.000 for every case)
        assert 0.9 <= max(meas) / peak <= 1.1, (rank, max(meas), peak)
        # and the same memory between the peaks: a buffer the simulator misses, a leak or a
        # release at the wrong instruction shows up here. Where a send completes (the peer
        # posted) a little sooner or later than the simulated times say, the two differ by that
        # message for some instructions (measured over 16 rank-runs: the 90th percentile of the
        # difference 0-3.8% of the peak, the largest 9%); the simulator releasing stashes at the
        # FREE after B instead of in B gives 7.5-31%.
        diffs = [abs(a - b) for a, b in zip(meas, pred, strict=True)]
        p90 = statistics.quantiles(diffs, n=10)[-1]
        assert p90 <= 0.06 * peak, (rank, p90, peak)
