"""TFLOPS of every usable ``helix::attention`` backend on one CUDA GPU.

    python benchmarks/gpu_attention.py                       # s in {8k, 32k, 128k}, d=128, causal, bf16
    python benchmarks/gpu_attention.py --seq 8192 --heads 8 --update-benchmarks-md

Times forward and backward separately with CUDA events (warm-up first, median of the timed
iterations). FLOPs follow the FlashAttention papers' convention: forward ``4*b*h*s^2*d``
(QK^T and PV), backward ``2.5x`` the forward (dV, dP, dQ, dK and the recomputed S = QK^T),
both halved for causal masks. Prints a markdown table; with ``--update-benchmarks-md`` it also
writes it into BENCHMARKS.md between ``<!-- gpu_attention:start -->`` and ``<!-- gpu_attention:end -->``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch

from helix_compiler.reporting import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helix_compiler.kernels import attention as A  # noqa: E402


def attention_flops(b: int, h: int, s: int, d: int, causal: bool) -> tuple[float, float]:
    fwd = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
    return fwd, 2.5 * fwd


def time_cuda(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_backend(name: str, b: int, h: int, hkv: int, s: int, d: int, dtype: torch.dtype,
                  causal: bool, warmup: int, iters: int) -> dict:
    backend = A.BACKENDS[name]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(b, h, s, d, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(b, hkv, s, d, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(b, hkv, s, d, device=dev, dtype=dtype, generator=gen)
    dout = torch.randn_like(q)
    scale = d ** -0.5
    out, lse = backend.forward(q, k, v, causal, scale)
    fwd_ms = time_cuda(lambda: backend.forward(q, k, v, causal, scale), warmup, iters)
    bwd_ms = time_cuda(lambda: backend.backward(dout, q, k, v, out, lse, causal, scale),
                       warmup, iters)
    fwd_flops, bwd_flops = attention_flops(b, h, s, d, causal)
    return {"backend": name, "s": s, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms,
            "fwd_tflops": fwd_flops / fwd_ms / 1e9, "bwd_tflops": bwd_flops / bwd_ms / 1e9}


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| backend | seq | fwd ms | fwd TFLOPS | bwd ms | bwd TFLOPS |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['s']} | – | – | – | {r['error']} |")
        else:
            lines.append(f"| {r['backend']} | {r['s']} | {r['fwd_ms']:.2f} | "
                         f"{r['fwd_tflops']:.1f} | {r['bwd_ms']:.2f} | {r['bwd_tflops']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA: K/V heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--backends", nargs="+", default=None, help="default: every usable one")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--update-benchmarks-md", action="store_true")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("gpu_attention.py needs a CUDA GPU and torch.cuda.is_available() is False here; "
              "nothing was measured.", file=sys.stderr)
        return 2

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    causal = not args.no_causal
    hkv = args.kv_heads or args.heads
    dev = torch.device("cuda")
    names = args.backends or list(A.BACKENDS)
    rows = []
    for name in names:
        reason = A.BACKENDS[name].reason_unusable(dev, dtype, args.head_dim)
        if reason is not None:
            print(f"skipping {name}: {reason}", file=sys.stderr)
            continue
        for s in args.seq:
            try:
                rows.append(bench_backend(name, args.batch, args.heads, hkv, s, args.head_dim,
                                          dtype, causal, args.warmup, args.iters))
            except torch.cuda.OutOfMemoryError:
                rows.append({"backend": name, "s": s, "error": "out of memory"})
            torch.cuda.empty_cache()
            print(rows[-1], file=sys.stderr)

    gpu = torch.cuda.get_device_name()
    header = (f"Attention backends on {gpu} (torch {torch.__version__}, {platform.python_version()}): "
              f"b={args.batch}, heads={args.heads}, kv_heads={hkv}, d={args.head_dim}, "
              f"{args.dtype}, {'causal' if causal else 'non-causal'}; median of {args.iters} after "
              f"{args.warmup} warm-up; FLOPs fwd 4bhs²d, bwd 2.5x fwd, halved for causal.\n\n"
              f"Command: `python benchmarks/gpu_attention.py {' '.join(argv or sys.argv[1:])}`")
    table = markdown(rows, header)
    print(table)
    if args.update_benchmarks_md:
        write_section(ROOT / "BENCHMARKS.md", "gpu_attention",
                      "## Attention backends: TFLOPS (GPU)\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
