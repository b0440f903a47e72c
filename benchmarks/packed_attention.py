"""Packed documents: what document masking saves in ``helix::attention`` (CPU, aten backend).

    python benchmarks/packed_attention.py              # s = 4096 and 8192, writes BENCHMARKS.md

For each sequence length, one call of forward + backward on one sequence packed with k
documents of random lengths, against the same call with one document (plain causal), in one
process, interleaved repeats, median of each. The measured time ratio is set beside the
cost model's ratio of computed scores (``attention_computed_fraction`` with the document
lengths over the one without): sum of l_i(l_i+1)/2 over s(s+1)/2. The document path runs the
CPU flash kernel once per document (no s x s mask exists), so per-call overhead shows at
many short documents.
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

from helix_compiler.cost.model import attention_computed_fraction  # noqa: E402
from helix_compiler.reporting import cpu_model, write_section  # noqa: E402


def _lengths(seq: int, k: int, gen: torch.Generator) -> list[int]:
    cuts = sorted(torch.randperm(seq - 1, generator=gen)[:k - 1].add(1).tolist())
    return [b - a for a, b in zip([0, *cuts], [*cuts, seq], strict=True)]


def _step(q, k, v, doc, dout):
    out, _ = torch.ops.helix.attention(q, k, v, doc, causal=True, scale=q.shape[-1] ** -0.5)
    torch.autograd.grad(out, (q, k, v), dout)


def measure(seq: int, docs: int, repeats: int, heads: int = 8, kv_heads: int = 4, dim: int = 64):
    gen = torch.Generator().manual_seed(seq + docs)
    q = torch.randn(1, heads, seq, dim, generator=gen).requires_grad_()
    k = torch.randn(1, kv_heads, seq, dim, generator=gen).requires_grad_()
    v = torch.randn(1, kv_heads, seq, dim, generator=gen).requires_grad_()
    dout = torch.randn(1, heads, seq, dim, generator=gen)
    lengths = _lengths(seq, docs, gen)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    doc = torch.ops.helix.document_ids(pos, None, None)
    times = {"causal": [], "packed": []}
    _step(q, k, v, None, dout)
    _step(q, k, v, doc, dout)
    for _ in range(repeats):  # interleaved: both see the same machine state
        for name, d in (("causal", None), ("packed", doc)):
            t0 = time.perf_counter()
            _step(q, k, v, d, dout)
            times[name].append(time.perf_counter() - t0)
    causal, packed = (statistics.median(times[n]) for n in ("causal", "packed"))
    frac = attention_computed_fraction(seq, seq, True, None, document_lengths=tuple(lengths))
    plain = attention_computed_fraction(seq, seq, True, None, document_lengths=(seq,))
    return {"seq": seq, "docs": docs, "lengths": lengths, "causal_s": causal, "packed_s": packed,
            "measured": packed / causal, "predicted": float(frac / plain)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--docs", type=int, nargs="+", default=[2, 4, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(s, d, args.repeats) for s in args.seqs for d in args.docs]
    cmd = "python benchmarks/packed_attention.py" + ("" if argv is None else " " + " ".join(argv))
    lines = ["## Packed documents: document-masked attention vs plain causal (CPU)", "",
             f"Machine: {os.cpu_count()} CPUs, {cpu_model()}; torch {torch.__version__}; Python "
             f"{platform.python_version()}; {args.threads} threads. Command: `{cmd}`. One sequence, "
             f"8 query heads, 4 KV heads, head dim 64, fp32, forward + backward of helix::attention "
             f"(aten backend: one CPU flash call per document), median of {args.repeats} interleaved "
             f"repeats. Predicted = the cost model's computed-score ratio (sum of l(l+1)/2 over s(s+1)/2), "
             f"which the simulator and the placement use under `document_lengths=`.", "",
             "| seq | documents | lengths | causal (s) | packed (s) | measured packed/causal | predicted |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        shown = ", ".join(map(str, r["lengths"][:6])) + (", ..." if len(r["lengths"]) > 6 else "")
        lines.append(f"| {r['seq']} | {r['docs']} | {shown} | {r['causal_s']:.3f} | {r['packed_s']:.3f} | "
                     f"{r['measured']:.2f} | {r['predicted']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", "packed_attention", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
