"""Memory is what the schedule says: the per-rank peak of a real run, from torch's allocator
events at instruction boundaries, against the simulator's prediction for the same program;
and nothing the schedule frees is still held at the end of a step."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.multiprocess]

SEQ, M = 256, 4


def _worker(rank: int, policy: str) -> dict:
    from helix_compiler import helix_compile
    from helix_compiler.models import Llama, LlamaConfig
    from helix_compiler.runtime.profiling import instruction_memory

    torch.manual_seed(0)
    pipe = helix_compile(Llama(LlamaConfig(num_layers=4, hidden=64)), 2, SEQ, num_microbatches=M,
                         recompute=policy, timeout=30)
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 256, (M, SEQ), generator=g), torch.randint(0, 256, (M, SEQ), generator=g)
    pipe(ids, labels).backward()  # the first step allocates the parameters' gradients
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        pipe(ids, labels).backward()
    mem = instruction_memory(prof)
    return dict(measured=max(m.live_bytes for m in mem), instructions=len(mem),
                program=len(pipe.stage.instrs), held=pipe.executor.live_bytes(),
                inflight=pipe.transport.inflight_send_bytes(),
                predicted=pipe.program.simulate(device="H20").peak_memory_bytes[rank])


@pytest.mark.parametrize("policy", ["none", "without_attention", "full"])
def test_measured_peak_memory_matches_the_simulator(policy):
    from helix_compiler.runtime.launch import spawn_ranks

    for rank, r in enumerate(spawn_ranks(_worker, 2, policy, timeout=180)):
        assert r["instructions"] == r["program"], r  # every instruction was seen by the profiler
        assert r["held"] == 0 and r["inflight"] == 0, r  # the step released every buffer it made
        ratio = r["measured"] / r["predicted"]
        # Measured here over many runs: none 1.01; without_attention and full mostly 0.97-1.04,
        # but single runs range from 0.88 to 1.17 (about two boundary buffers either way at the
        # peak; not explained yet, see the open runtime issue). The bound covers that spread:
        # it catches a buffer class the simulator misses or a leak, not a 10% claim.
        assert 0.8 <= ratio <= 1.25, (rank, policy, r, ratio)
