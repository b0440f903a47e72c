"""Data-parallel overhead: pp=2 x dp=2 against pp=2 alone on one replica's batch (CPU, gloo).

    python benchmarks/dp_overhead.py                 # writes the BENCHMARKS.md section

One launch of 4 ranks (1 thread each). Phase "pp2 x dp2": both replicas train, each on its own
batch of M micro batches, gradients summed over dp by the bucketed reducer overlapped with the
backward half. Phase "pp2 alone": replica 0 trains the same model on the same batch size with
no dp group (pipeline over its two ranks only) while replica 1 waits at a barrier. Phases
alternate step by step, medians reported. Also reported: the reducer's buckets, bytes, how
many buckets started before the step's end, and the seconds the step's end still waited.

On a machine with fewer cores than ranks the dp phase also pays for sharing the cores (the
idle replica of the pp-alone phase sleeps in a barrier): the ratio is an upper bound there.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helix_compiler.reporting import cpu_model, write_section  # noqa: E402


def _worker(rank: int, cfg: dict) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from helix_compiler import helix_compile
    from helix_compiler.models import Llama, LlamaConfig

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    dp_rank = mesh["dp"].get_local_rank()
    seq, M = cfg["seq"], cfg["M"]

    def build():
        torch.manual_seed(0)
        return Llama(LlamaConfig(num_layers=cfg["layers"], hidden=cfg["hidden"], heads=4, kv_heads=2,
                                 ffn=int(8 * cfg["hidden"] / 3), vocab_size=1024))

    both = helix_compile(build(), 2, seq, num_microbatches=M, mesh=mesh, timeout=300)
    # pp2 alone: the same pipeline group without a dp group (replica 1's is built, never run)
    pp_only = helix_compile(build(), 2, seq, num_microbatches=M, timeout=300, transport=_pp_transport(mesh))
    gen = torch.Generator().manual_seed(dp_rank)
    ids = torch.randint(0, 1024, (M, seq), generator=gen)
    labels = torch.randint(0, 1024, (M, seq), generator=gen)
    times = {"dp": [], "alone": []}
    stats = []
    for step in range(cfg["warmup"] + cfg["repeats"]):
        dist.barrier()
        t0 = time.perf_counter()
        both(ids, labels).backward()
        t = time.perf_counter() - t0
        if step >= cfg["warmup"]:
            times["dp"].append(t)
            stats.append(both.reducer.stats)
        for p in both.parameters():
            p.grad = None
        dist.barrier()
        if dp_rank == 0:
            t0 = time.perf_counter()
            pp_only(ids, labels).backward()
            t = time.perf_counter() - t0
            if step >= cfg["warmup"]:
                times["alone"].append(t)
            for p in pp_only.parameters():
                p.grad = None
        dist.barrier()
    s = stats[-1]
    return {"rank": rank, "dp_rank": dp_rank, "times": times,
            "stats": {"buckets": s.buckets, "nbytes": s.nbytes, "overlapped": s.overlapped,
                      "exposed_s": statistics.median(x.exposed_s for x in stats)}}


def _pp_transport(mesh):
    from helix_compiler.runtime.transport import Transport

    return Transport(group=mesh["pp"].get_group(), timeout=300)


def main(argv=None) -> int:
    from helix_compiler.runtime.launch import spawn_ranks

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--M", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    cfg = vars(args)
    results = spawn_ranks(_worker, 4, cfg, timeout=1800)
    rows = []
    for r in sorted(results, key=lambda r: r["rank"]):
        dp_t = statistics.median(r["times"]["dp"])
        alone = statistics.median(r["times"]["alone"]) if r["times"]["alone"] else None
        rows.append((r, dp_t, alone))
    cmd = "python benchmarks/dp_overhead.py" + ("" if argv is None else " " + " ".join(argv))
    lines = ["## Data parallelism: pp=2 x dp=2 vs pp=2 alone (CPU, gloo)", "",
             f"Machine: {os.cpu_count()} CPUs, {cpu_model()}; torch {torch.__version__}; Python "
             f"{platform.python_version()}; 4 ranks x 1 thread in one launch. Command: `{cmd}`. Llama-style, "
             f"{args.layers} layers, hidden {args.hidden}, s={args.seq}, M={args.M} micro batches per replica, "
             f"helix schedule; median of {args.repeats} alternating steps (forward + backward). The "
             f"reducer's last step: buckets, bytes summed over dp, buckets started during the backward "
             f"half, and the median seconds the step's end still waited for them.", "",
             "| rank | dp rank | pp2 x dp2 step (s) | pp2 alone step (s) | ratio | buckets | MiB reduced | "
             "started early | exposed wait (s) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r, dp_t, alone in rows:
        st = r["stats"]
        alone_s, ratio = (f"{alone:.3f}", f"{dp_t / alone:.2f}") if alone else ("-", "-")
        lines.append(f"| {r['rank']} | {r['dp_rank']} | {dp_t:.3f} | {alone_s} | {ratio} | {st['buckets']} | "
                     f"{st['nbytes'] / 2**20:.1f} | {st['overlapped']} | {st['exposed_s']:.3f} |")
    if os.cpu_count() < 4:
        lines += ["", f"This machine has {os.cpu_count()} cores for 4 ranks: in the dp phase all four "
                      f"compute at once, in the pp-alone phase two do, so the ratio includes core sharing "
                      f"(an upper bound on the dp overhead); the exposed wait is the reduction's own cost."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", "dp_overhead", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
