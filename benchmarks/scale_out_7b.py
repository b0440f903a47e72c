"""Simulated 7B Llama at 128k tokens on p=8 pipeline stages x tp=8 (H20 preset): per-GPU peak
memory (activations + parameters + gradients + Adam state) against the device's 96 GB, and the
iteration time of helix against 1F1B, ZB1P and interleaved 1F1B with one layer per virtual
stage, all with the same tp and the same recompute, at M = 2p and 4p.

Three tensor-parallel models side by side:

* ``compiled SP``: ``compile_program(..., tensor_parallel=8)``: the segment graphs the runtime
  runs on one tp rank (``passes.tensor_parallel``: heads, MLP, embedding and head split,
  sequence parallelism between the parallel regions), their own FLOPs, bytes and tp
  collectives (rings over the intra-node links);
* ``compiled, no SP``: the same with ``sequence_parallel=False`` (activations outside the
  parallel regions replicated on the tp ranks, all-reduces instead of all-gather /
  reduce-scatter pairs);
* ``/tp assumed``: the tp=1 program simulated with ``tp=8`` (``HelixProgram.simulate(tp=)``):
  durations, messages and activations divided by 8, no collectives.

The model is built on the meta device (no weights are allocated).

    python benchmarks/scale_out_7b.py            # table -> BENCHMARKS.md
    python benchmarks/scale_out_7b.py --no-write
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from helix_compiler import compile_program
from helix_compiler.models import Llama, LlamaConfig
from helix_compiler.reporting import cpu_model, write_section

ROOT = Path(__file__).resolve().parents[1]
P, TP, SEQ, LAYERS = 8, 8, 131072, 32
RECOMPUTE = "without_attention"


def llama_7b():
    with torch.device("meta"):
        cfg = LlamaConfig(vocab_size=32000, num_layers=LAYERS, hidden=4096, heads=32, kv_heads=32, ffn=11008)
        return Llama(cfg).to(torch.bfloat16)


def candidates(M: int):
    v = LAYERS // P  # one layer per virtual stage
    return [("helix F=2", dict(schedule="helix", num_folds=2)), ("helix F=1", dict(schedule="helix", num_folds=1)),
            ("1F1B", dict(schedule="1f1b", num_folds=1)), ("ZB1P", dict(schedule="zb1p", num_folds=1)),
            (f"interleaved v={v}", dict(schedule="interleaved", num_folds=1, virtual_stages=v))]


def run(device: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    model = llama_7b()
    compiled = compile_program(model, pp_size=P, seq_len=SEQ, num_microbatches=2 * P, tensor_parallel=TP,
                               recompute=RECOMPUTE)
    replicated = compile_program(model, pp_size=P, seq_len=SEQ, num_microbatches=2 * P, tensor_parallel=TP,
                                 sequence_parallel=False, recompute=RECOMPUTE)
    plain = compile_program(model, pp_size=P, seq_len=SEQ, num_microbatches=2 * P, recompute=RECOMPUTE)
    compile_s = time.perf_counter() - t0
    limit = None
    rows = []
    for M in (2 * P, 4 * P):
        for name, opts in candidates(M):
            for tp_model, prog, sim_tp in (("compiled SP", compiled, 1), ("compiled, no SP", replicated, 1),
                                           ("/tp assumed", plain, TP)):
                res = prog.reschedule(num_microbatches=M, **opts).simulate(device=device, tp=sim_tp)
                limit = res.meta["device_memory_bytes"]
                mem = max(res.total_peak_memory_bytes)
                acts = max(res.peak_memory_bytes)
                rows.append((M, name, tp_model, res.iteration_time, res.bubble_ratio, acts, mem, mem <= limit))
    lines = [f"| M | schedule | tp model | iteration (s) | vs helix F=2 | bubble | peak activations (GB) | "
             f"peak memory per GPU (GB) | fits {limit / 1e9:.0f} GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {(r[0], r[2]): r[3] for r in rows if r[1] == "helix F=2"}
    for M, name, tpm, it, bub, acts, mem, fits in rows:
        lines.append(f"| {M} | {name} | {tpm} | {it:.2f} | {it / base[(M, tpm)]:.2f}x | {bub:.3f} | {acts / 1e9:.1f} | "
                     f"{mem / 1e9:.1f} | {'yes' if fits else 'no'} |")
    return "\n".join(lines), reading(rows), compile_s


def reading(rows) -> str:
    """What the table says, computed from it."""
    at = {(M, name, tpm): (it, mem, fits) for M, name, tpm, it, _bubble, _acts, mem, fits in rows}
    parts = []
    for M in sorted({r[0] for r in rows}):
        sp = {name: v for (m, name, tpm), v in at.items() if m == M and tpm == "compiled SP"}
        it, mem, fits = sp["helix F=2"]
        fitting = sorted((v[0], name) for name, v in sp.items() if v[2])
        best = ("it is the fastest that fits" if fitting and fitting[0][1] == "helix F=2"
                else f"the fastest that fits is {fitting[0][1]}" if fitting else "nothing fits")
        others = ", ".join(f"{name} {v[0] / it:.2f}x its time" + ("" if v[2] else f" (does not fit: {v[1] / 1e9:.0f} GB)")
                           for name, v in sp.items() if name != "helix F=2")
        parts.append(f"at M={M} ({M // P}p) helix F=2 needs {mem / 1e9:.1f} GB per GPU "
                     f"({'fits' if fits else 'does not fit'}) and {best}; {others}")
    no_sp = sorted({f"{name} at M={m}" for (m, name, tpm), v in at.items() if tpm == "compiled, no SP" and v[2]})
    slow = [at[(m, name, "compiled SP")][0] / at[(m, name, "/tp assumed")][0]
            for (m, name, tpm) in at if tpm == "compiled SP"]
    return ("Reading (computed from the table): with sequence and vocabulary parallelism, " + "; ".join(parts)
            + ". Without sequence parallelism " + (("only " + ", ".join(no_sp) + " fit") if no_sp else "nothing fits")
            + f". The compiled programs are {_span(slow)} slower than the `/tp assumed` shortcut: that is the tp "
            "collectives, which are not overlapped with compute here.")


def _span(ratios) -> str:
    lo, hi = (f"{100 * (r - 1):.0f}" for r in (min(ratios), max(ratios)))
    return f"{lo}%" if lo == hi else f"{lo}-{hi}%"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="H20")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    table, read, compile_s = run(args.device)
    cmd = "python benchmarks/scale_out_7b.py" + ("" if args.device == "H20" else f" --device {args.device}")
    body = "\n".join([
        f"## 7B Llama, s=128k, p={P} x tp={TP}, {args.device} (simulated)",
        "",
        f"Command: `{shlex.join(cmd.split())}` (machine: {cpu_model()}; compiling the three programs took "
        f"{compile_s:.1f} s). L=32, h=4096, 32 heads, ffn 11008, V=32000, bf16, recompute "
        f"`{RECOMPUTE}` for every schedule, micro batch 1. Peak memory per GPU = the simulator's "
        f"activations + parameters + gradients + Adam state (bf16 parameters and gradients, fp32 "
        f"master weights and moments: 16 bytes per parameter, `sim.memory`). `compiled SP`: the "
        f"tensor-parallel segment graphs the runtime runs, with sequence and vocabulary parallelism "
        f"(embedding, head and cross-entropy split by vocabulary), their own "
        f"per-rank FLOPs, bytes and tp collectives (rings over the intra-node links, not overlapped). "
        f"`compiled, no SP`: the same without sequence parallelism (the residual stream, norms and the "
        f"tensors crossing stages outside the parallel regions replicated on the 8 tp ranks). "
        f"`/tp assumed`: the tp=1 program with every activation and duration divided by 8 and no "
        f"collectives (the schedule search's shortcut).",
        "",
        table,
        "",
        read,
    ])
    print(body)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", "scale_out_7b", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
