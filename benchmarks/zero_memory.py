"""Optimizer-state memory per rank with and without ZeRO-1 over dp (pp=2 x dp=2, CPU, gloo).

    python benchmarks/zero_memory.py                 # writes the BENCHMARKS.md section

One launch of 4 ranks (1 thread each): a Llama-style model (L=4, h=256, ffn 688, V=1024,
s=1024, M=4) trained two steps with AdamW over ``pipe.parameters()``, then two steps of a
fresh copy with ``helix_compiler.sharded_optimizer(pipe, AdamW)`` (torch's
``ZeroRedundancyOptimizer`` over the dp group). Reported per rank: the parameter bytes it
owns and the bytes of its optimizer state (``runtime.zero.optimizer_state_bytes``), and the
median step time of each (noisy on a 2-core machine: the ratio, not the absolute).
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


def _worker(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from helix_compiler import helix_compile, sharded_optimizer
    from helix_compiler.models import Llama, LlamaConfig
    from helix_compiler.runtime.zero import optimizer_state_bytes

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    out = {}
    for mode in ("AdamW", "ZeRO-1 AdamW"):
        torch.manual_seed(0)
        model = Llama(LlamaConfig(vocab_size=1024, num_layers=4, hidden=256, heads=4, kv_heads=2, ffn=688))
        pipe = helix_compile(model, 2, SEQ, num_microbatches=M, mesh=mesh, timeout=120)
        opt = (torch.optim.AdamW(list(pipe.parameters()), lr=1e-3) if mode == "AdamW"
               else sharded_optimizer(pipe, torch.optim.AdamW, lr=1e-3))
        g = torch.Generator().manual_seed(mesh["dp"].get_local_rank())
        times = []
        for _ in range(3):
            ids = torch.randint(0, 1024, (M, SEQ), generator=g)
            t0 = time.perf_counter()
            pipe(ids, ids.roll(-1, 1)).backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
        out[mode] = dict(state=optimizer_state_bytes(opt), step=statistics.median(times[1:]),
                         params=sum(p.numel() * p.element_size() for p in pipe.parameters()))
    return out


def main(argv=None) -> int:
    from helix_compiler.runtime.launch import spawn_ranks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    results = spawn_ranks(_worker, 4, timeout=900)
    mib = 2 ** 20
    lines = ["## Optimizer state sharded over dp (ZeRO-1), pp=2 x dp=2 (CPU, gloo)", "",
             f"Command: `python benchmarks/zero_memory.py` (machine: {cpu_model()}, 4 ranks x 1 thread). "
             f"Llama L=4, h=256, ffn 688, V=1024, fp32, s={SEQ}, M={M}; AdamW (two fp32 moments per "
             f"parameter). Global rank r = dp index x 2 + pipeline rank.", "",
             "| rank | owned parameters (MiB) | AdamW state (MiB) | ZeRO-1 AdamW state (MiB) | state saved | "
             "step ZeRO-1 / AdamW |", "|---|---|---|---|---|---|"]
    for r, res in enumerate(results):
        plain, zero = res["AdamW"], res["ZeRO-1 AdamW"]
        lines.append(f"| {r} | {plain['params'] / mib:.2f} | {plain['state'] / mib:.2f} | {zero['state'] / mib:.2f} | "
                     f"{1 - zero['state'] / plain['state']:.0%} | {zero['step'] / plain['step']:.2f}x |")
    lines += ["", "Parameters and gradients stay whole on every replica (ZeRO stage 1: "
              "`torch.distributed.optim.ZeroRedundancyOptimizer` partitions the parameters over the dp "
              "group by size, steps its part and broadcasts the updated values)."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", "zero_memory", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
