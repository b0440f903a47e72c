"""Per-rank memory of the three data-parallel modes side by side (pp=2 x dp=2, CPU, gloo).

    python benchmarks/dp_memory.py                 # writes the BENCHMARKS.md section

One launch of 4 ranks (1 thread each); the model of ``benchmarks/zero_memory.py`` (Llama L=4,
h=256, ffn 688, V=1024, fp32, s=1024, M=4), AdamW, for each mode a fresh pipeline:

* replicated: ``torch.optim.AdamW(pipe.parameters())``, gradients all-reduced over dp;
* ZeRO-1: ``helix_compiler.sharded_optimizer(pipe, AdamW)`` (optimizer state sharded);
* dp_shard: ``helix_compile(..., dp_shard=True)`` and a plain AdamW over the DTensor shards
  (parameters, gradients and so optimizer state sharded).

Reported per rank: resident bytes of parameters and optimizer state between steps, of the
gradients after the backward half (held until the optimizer step), and the peak during a
whole step (forward, backward, optimizer step): the resident bytes before it plus the peak of
the allocator's live bytes over the step (``torch.profiler`` memory events, every CPU
allocation of the process: activations, messages, gathered parameters, collectives' buffers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helix_compiler.reporting import cpu_model, write_section  # noqa: E402

SEQ, M = 1024, 4
MODES = ("replicated", "ZeRO-1", "dp_shard")


def _peak_bytes(prof) -> int:
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    total = peak = 0
    for _, n in events:
        total += n
        peak = max(peak, total)
    return peak


def _worker(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from helix_compiler import helix_compile, sharded_optimizer
    from helix_compiler.models import Llama, LlamaConfig
    from helix_compiler.runtime.dp_shard import parameter_bytes
    from helix_compiler.runtime.zero import optimizer_state_bytes

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    out = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = Llama(LlamaConfig(vocab_size=1024, num_layers=4, hidden=256, heads=4, kv_heads=2, ffn=688))
        pipe = helix_compile(model, 2, SEQ, num_microbatches=M, mesh=mesh, timeout=120,
                             dp_shard=mode == "dp_shard")
        del model
        opt = (sharded_optimizer(pipe, torch.optim.AdamW, lr=1e-3) if mode == "ZeRO-1"
               else torch.optim.AdamW(list(pipe.parameters()), lr=1e-3))
        g = torch.Generator().manual_seed(mesh["dp"].get_local_rank())
        times, res = [], {}
        for step in range(3):
            ids = torch.randint(0, 1024, (M, SEQ), generator=g)
            profiled = step == 1  # after the first step made the optimizer state
            before = parameter_bytes(pipe)["params"] + optimizer_state_bytes(opt)
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                          profile_memory=True) if profiled else None
            if prof is not None:
                prof.__enter__()
            t0 = time.perf_counter()
            pipe(ids, ids.roll(-1, 1)).backward()
            grads = parameter_bytes(pipe)["grads"]
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
            if prof is not None:
                prof.__exit__(None, None, None)
                res = dict(grads=grads, peak=before + _peak_bytes(prof))
        res.update(params=parameter_bytes(pipe)["params"], state=optimizer_state_bytes(opt),
                   step=statistics.median([times[0], times[2]]))
        out[mode] = res
        del pipe, opt
    return out


def main(argv=None) -> int:
    from helix_compiler.runtime.launch import spawn_ranks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    results = spawn_ranks(_worker, 4, timeout=1500)
    mib = 2 ** 20
    lines = ["## Memory per rank of the data-parallel modes, pp=2 x dp=2 (CPU, gloo)", "",
             f"Command: `python benchmarks/dp_memory.py` (machine: {cpu_model()}, 4 ranks x 1 thread). "
             f"Llama L=4, h=256, ffn 688, V=1024, fp32, s={SEQ}, M={M}, AdamW. Global rank r = dp index x 2 + "
             f"pipeline rank. Parameters and optimizer state: resident between steps; gradients: after the "
             f"backward half, until the optimizer step; peak: during a whole step (resident before it plus "
             f"the allocator's peak over forward, backward and optimizer step, torch.profiler memory "
             f"events).", "",
             "| rank | mode | parameters (MiB) | gradients (MiB) | AdamW state (MiB) | peak in a step (MiB) | "
             "step time vs replicated |", "|---|---|---|---|---|---|---|"]
    for r, res in enumerate(results):
        base = res["replicated"]
        for mode in MODES:
            m = res[mode]
            lines.append(f"| {r} | {mode} | {m['params'] / mib:.2f} | {m['grads'] / mib:.2f} | "
                         f"{m['state'] / mib:.2f} | {m['peak'] / mib:.1f} | {m['step'] / base['step']:.2f}x |")
    tot = {mode: sum(res[mode]["params"] + res[mode]["state"] for res in results) / len(results) / mib
           for mode in MODES}
    lines += ["", "Mean over ranks of parameters + optimizer state between steps: " + ", ".join(
        f"{mode} {tot[mode]:.2f} MiB" for mode in MODES) + ". ZeRO-1 shards the optimizer state "
              "(torch's `ZeroRedundancyOptimizer`); dp_shard also the parameters and gradients "
              "(DTensor `Shard(0)` over dp, all-gathered once per call and reduce-scattered as they are "
              "final, `runtime.dp_shard`), so during a step it holds the full parameters of its "
              "pipeline rank again: its peak saves the sharded state and gradients, not the "
              "parameters. Step times are noisy on a 2-core machine."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", "dp_memory", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
