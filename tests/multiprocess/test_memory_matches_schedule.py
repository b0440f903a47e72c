"""Memory is what the schedule says: a real run's memory after every instruction, from torch's
allocator events, against the simulator's for the same program fed with the instruction times
this run measured (``sim.measured.measured_op_times``: the simulator's "measured profile");
and nothing the schedule frees is still held at the end of a step.

Sends are rendezvous, so a sent buffer lives until the peer has posted its receive and the
transport's completion thread has seen the send finish (it needs the GIL): when that happens
depends on both ranks' timing, and the simulator's times are medians. The issue's bound is
on the per-rank peak (within 10%); between the peaks the typical instruction must agree.
"""

from __future__ import annotations

import statistics

import pytest
import torch

pytestmark = [pytest.mark.multiprocess]

SEQ, M = 256, 4
# (model, recompute, schedule): helix hands a layer's attention over to another rank; 1F1B keeps
# each layer on one rank, where a segment's inputs are its predecessor's stash and outputs
CASES = [("llama", "none", "helix"), ("llama", "without_attention", "helix"), ("llama", "full", "helix"),
         ("gpt", "without_attention", "helix"), ("llama", "without_attention", "1f1b")]


def _profiled_step(pipe, ids, labels, rank: int) -> dict:
    from helix_compiler.runtime.profiling import instruction_memory
    from helix_compiler.sim.engine import simulate_times
    from helix_compiler.sim.measured import instruction_samples, measured_op_times

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
                predicted=sim.memory_after[rank], held=pipe.executor.live_bytes(),
                inflight=pipe.transport.inflight_send_bytes())


def _worker(rank: int, name: str, policy: str, schedule: str) -> dict:
    from models_for_tests import build

    from helix_compiler import helix_compile

    model, loss_fn = build(name, num_layers=4)
    pipe = helix_compile(model.float(), 2, SEQ, num_microbatches=M, recompute=policy, loss_fn=loss_fn,
                         schedule=schedule, timeout=30, record_trace=True)
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 256, (M, SEQ), generator=g), torch.randint(0, 256, (M, SEQ), generator=g)
    pipe(ids, labels).backward()  # the first step allocates the parameters' gradients
    return dict(_profiled_step(pipe, ids, labels, rank), program=[str(i) for i in pipe.stage.instrs])


@pytest.mark.parametrize("name, policy, schedule", CASES, ids=["-".join(c) for c in CASES])
def test_measured_memory_matches_the_simulator(name, policy, schedule):
    from helix_compiler.runtime.launch import spawn_ranks

    for rank, r in enumerate(spawn_ranks(_worker, 2, name, policy, schedule, timeout=180)):
        assert r["seen"] == r["program"], rank  # the profiler saw every instruction, in program order
        assert r["held"] == 0 and r["inflight"] == 0, r  # the step released every buffer it made
        meas, pred = r["measured"], r["predicted"]
        # measured over 20 rank-runs: 1.0001-1.0005, and 1.054 once with another job on the
        # machine (one send completing later than simulated)
        assert 0.9 <= max(meas) / max(pred) <= 1.1, (rank, max(meas), max(pred))
        # a buffer the simulator misses or a leak shows on most instructions (measured: the
        # median difference 0.01-0.05% of the peak; a late send moves a few instructions)
        median = statistics.median(abs(a - b) for a, b in zip(meas, pred, strict=True))
        assert median <= 0.01 * max(pred), (rank, median, max(pred))
