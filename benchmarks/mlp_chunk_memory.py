"""Peak memory of one MLP block, forward + backward, with ``chunk_mlp`` (recompute=True), on CPU.

    python benchmarks/mlp_chunk_memory.py                 # s=32768, h=1024, ffn=4h, fp32, n in {1,2,4,8}
    python benchmarks/mlp_chunk_memory.py --seq 4096 --no-write

The block is ``x + fc2(gelu(fc1(x)))`` (GPT-style, biases, tanh GeLU), exported with
``torch.export`` (dynamic seq) and rewritten by ``chunk_mlp``. Memory is *measured*: the run
is wrapped in ``torch.profiler.profile(profile_memory=True)`` and the peak is the maximum of
the CPU allocator's "Total Allocated" counter over the run, i.e. bytes allocated during forward
+ backward and still live (the parameters, x and dy exist before and are not counted; BLAS
scratch memory outside torch's allocator is not seen). The rows also show the unrewritten
graph (plain autograd, which saves the [s, ffn] fc1 and GeLU outputs).

From the measured peaks P(n) of the chunked rows we fit P(n) = A + B/n (least squares): A is
the part that does not depend on the chunk count (output, dx, weight grads, ...), B the
[s, ffn]-sized working set at n=1. ``(P - A) * n`` staying near B is the shrink-by-n claim.
Results go to stdout and to BENCHMARKS.md between ``<!-- mlp_chunk:start -->`` and
``<!-- mlp_chunk:end -->`` (other sections are kept).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from helix_compiler.reporting import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helix_compiler.passes.mlp_chunk import chunk_mlp  # noqa: E402

MiB = 2**20


class MLPBlock(nn.Module):
    def __init__(self, h: int, ffn: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(h, ffn), nn.Linear(ffn, h)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def peak_allocated(fn) -> tuple[int, float]:
    """(peak bytes allocated by torch's CPU allocator during ``fn()`` above the level at its
    start, seconds)."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = json.load(open(path))["traceEvents"]
    mem = sorted((e for e in events
                  if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                 key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    if not mem:
        return 0, seconds
    # the allocator's counter is process-wide: measure from its value before the first event
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in mem) - start, seconds


def fit(ns: list[int], peaks: list[int]) -> tuple[float, float]:
    """Least squares P = A + B/n."""
    xs = [1.0 / n for n in ns]
    mx, my = sum(xs) / len(xs), sum(peaks) / len(peaks)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, peaks, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=None, help="default 4*hidden")
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    h, s = args.hidden, args.seq
    ffn = args.ffn or 4 * h

    torch.manual_seed(0)
    model = MLPBlock(h, ffn)
    example = torch.randn(1, 16, h)
    gm = torch.export.export(model, (example,), strict=False, dynamic_shapes={
        "x": {1: torch.export.Dim("seq", min=2, max=max(s, 32))}}).module()
    x = torch.randn(1, s, h, requires_grad=True)
    dy = torch.randn(1, s, h)

    def clear(g):
        for q in g.parameters():
            q.grad = None
        x.grad = None

    def run(g):
        g(x).backward(dy)

    rows = []
    variants = [("unrewritten graph (autograd)", None)] + [(f"chunk_mlp n={n}", n)
                                                         for n in args.chunks]
    for label, n in variants:
        g = copy.deepcopy(gm)
        if n is not None:
            chunk_mlp(g, num_chunks=n, recompute=True)
        run(g)  # warm-up (first-call allocations, BLAS init)
        clear(g)
        peak, secs = peak_allocated(lambda g=g: run(g))
        clear(g)
        rows.append({"label": label, "n": n, "peak": peak, "secs": secs})
        print(f"{label}: peak {peak / MiB:.0f} MiB, {secs:.1f} s", file=sys.stderr)

    chunked = [r for r in rows if r["n"] is not None]
    a, b = fit([r["n"] for r in chunked], [r["peak"] for r in chunked])
    sf = s * ffn * 4  # one fp32 [s, ffn] tensor
    sh = s * h * 4
    lines = [
        f"Peak CPU memory of one MLP block forward + backward (measured: torch.profiler "
        f"profile_memory, max of the allocator's Total Allocated; params, x, dy excluded). "
        f"b=1, s={s}, h={h}, ffn={ffn}, fp32, GeLU(tanh) MLP with biases, recompute=True. "
        f"One [s, ffn] tensor = {sf / MiB:.0f} MiB, one [s, h] tensor = {sh / MiB:.0f} MiB.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python "
        f"{platform.python_version()}.",
        "Command: `" + " ".join(["python benchmarks/mlp_chunk_memory.py",
                                 *(argv if argv is not None else sys.argv[1:])]) + "`",
        "",
        "| variant | peak MiB | peak − A MiB | (peak − A)·n in [s, ffn] tensors | time s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["n"] is None:
            lines.append(f"| {r['label']} | {r['peak'] / MiB:.0f} | – | – | {r['secs']:.1f} |")
        else:
            var = r["peak"] - a
            lines.append(f"| {r['label']} | {r['peak'] / MiB:.0f} | {var / MiB:.0f} | "
                         f"{var * r['n'] / sf:.2f} | {r['secs']:.1f} |")
    lines += ["", f"Fit over the chunked rows, peak = A + B/n: A = {a / MiB:.0f} MiB "
              f"({a / sh:.2f} [s, h] tensors), B = {b / MiB:.0f} MiB ({b / sf:.2f} [s, ffn] "
              f"tensors): the chunk-dependent working set shrinks as 1/n."]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", "mlp_chunk",
                      "## MLP chunking: peak memory (CPU)\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
