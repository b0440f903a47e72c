"""Compile time of the offline front half for a Llama-7B shape at 131072 tokens.

    python benchmarks/compile_time.py                 # L=32, s=131072, p=4 -> stdout + BENCHMARKS.md
    python benchmarks/compile_time.py --layers 4 --no-write

The model (``helix_compiler.models.Llama``: L=32, h=4096, 32 heads, 8 KV heads, ffn 11008,
V=32000) is built under ``torch.device("meta")``: no weights are allocated. The script runs
the steps of ``helix_compiler.compile_program`` one by one, in its order and with its
arguments, and times each (wall and process CPU seconds): config validation, capture (with
the ``torch.export`` call inside it timed on its own), attention canonicalization, layer
tagging, the min-cut, segment construction, recompute marks, the sympy cost model and the
schedule. Peak RSS is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end (whole process,
torch included). ``--check`` also runs ``compile_program`` itself and compares the results.

The markdown table is printed and written to BENCHMARKS.md between
``<!-- compile_time:start -->`` and ``<!-- compile_time:end -->`` (other sections untouched).
Target (issue 2): under 5 s and under 2 GiB.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

T_START = time.perf_counter()
C_START = time.process_time()

import torch  # noqa: E402

import helix_compiler.capture.export as export_mod  # noqa: E402
from helix_compiler import compile_program  # noqa: E402
from helix_compiler.capture import capture  # noqa: E402
from helix_compiler.config import HelixConfig  # noqa: E402
from helix_compiler.cost.model import segment_cost  # noqa: E402
from helix_compiler.errors import HelixError  # noqa: E402
from helix_compiler.models import Llama, LlamaConfig  # noqa: E402
from helix_compiler.passes.attention import canonicalize_attention  # noqa: E402
from helix_compiler.passes.cut import cut_attention  # noqa: E402
from helix_compiler.passes.layers import tag_layers  # noqa: E402
from helix_compiler.passes.recompute import mark_recompute  # noqa: E402
from helix_compiler.passes.segment import build_segments  # noqa: E402
from helix_compiler.program import HelixProgram, _build_schedule  # noqa: E402
from helix_compiler.reporting import cpu_model, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- compile_time:start -->", "<!-- compile_time:end -->"
TARGET_S, TARGET_RSS = 5.0, 2 * 2**30


class Timer:
    def __init__(self):
        self.rows: list[tuple[str, float, float]] = []  # (phase, wall s, cpu s)

    @contextmanager
    def phase(self, name: str):
        w, c = time.perf_counter(), time.process_time()
        yield
        self.rows.append((name, time.perf_counter() - w, time.process_time() - c))


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def run_phases(model, *, pp_size: int, seq_len: int, micro_batch_size: int = 1,
               recompute: str = "without_attention", timer: Timer) -> HelixProgram:
    """``compile_program``'s steps, in its order, each under ``timer``."""
    with timer.phase("config"):
        config = HelixConfig(pp_size=pp_size, seq_len=seq_len, micro_batch_size=micro_batch_size,
                             recompute=recompute)
    export_time: list[float] = []
    export_cpu: list[float] = []
    inner = export_mod._export

    def timed_export(*args, **kwargs):
        w, c = time.perf_counter(), time.process_time()
        try:
            return inner(*args, **kwargs)
        finally:
            export_time.append(time.perf_counter() - w)
            export_cpu.append(time.process_time() - c)

    export_mod._export = timed_export
    try:
        with timer.phase("capture (total)"):
            captured = capture(model, seq_len=seq_len)
    finally:
        export_mod._export = inner
    timer.rows.append(("  of which torch.export", sum(export_time), sum(export_cpu)))
    gm = captured.gm
    with timer.phase("canonicalize attention"):
        canonicalize_attention(gm)
    with timer.phase("tag layers"):
        _, layers = tag_layers(gm)
    if pp_size > layers.num_layers:
        raise HelixError(f"pp_size={pp_size} is larger than the model's {layers.num_layers} layers")
    with timer.phase("cut around attention"):
        _, cuts = cut_attention(gm, to_expr=captured.to_cost_expr, seq_len=seq_len,
                                micro_batch_size=micro_batch_size)
    with timer.phase("build segments"):
        segments = build_segments(gm, num_layers=layers.num_layers, to_expr=captured.to_cost_expr)
    with timer.phase("recompute marks"):
        mark_recompute(segments, policy=recompute)
    with timer.phase("cost model (sympy)"):
        all_params = dict(gm.named_parameters(remove_duplicate=False))
        param_bytes = {name: p.numel() * p.element_size() for name, p in all_params.items()}
        owned: set[int] = set()
        for seg in segments:
            mine = {n for n in seg.params if id(all_params[n]) not in owned}
            owned |= {id(all_params[n]) for n in seg.params}
            seg.cost = segment_cost(seg, to_expr=captured.to_cost_expr, owned_params=mine, param_bytes=param_bytes)
    program = HelixProgram(config=config, captured=captured, layers=layers, cuts=cuts, segments=segments)
    with timer.phase("schedule"):
        program.schedule = _build_schedule(program)
    return program


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--pp-size", type=int, default=4)
    ap.add_argument("--check", action="store_true", help="also run compile_program and compare")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args(argv)
    command = "python benchmarks/compile_time.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                      " " + shlex.join(sys.argv[1:] if argv is None else argv))
    import_s, import_cpu = time.perf_counter() - T_START, time.process_time() - C_START
    load_before = os.getloadavg()

    timer = Timer()
    cfg = LlamaConfig(vocab_size=32000, num_layers=args.layers, hidden=4096, heads=32, kv_heads=8, ffn=11008)
    with timer.phase("build model (meta)"):
        with torch.device("meta"):
            model = Llama(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    build_row = timer.rows.pop()
    program = run_phases(model, pp_size=args.pp_size, seq_len=args.seq_len, timer=timer)
    peak = peak_rss_bytes()
    load_after = os.getloadavg()
    compile_rows = [r for r in timer.rows if not r[0].startswith("  ")]
    total_wall = sum(r[1] for r in compile_rows)
    total_cpu = sum(r[2] for r in compile_rows)
    export_wall = next(r[1] for r in timer.rows if "torch.export" in r[0])
    assert all(p.device.type == "meta" for p in model.parameters())

    if args.check:
        t = time.perf_counter()
        ref = compile_program(model, pp_size=args.pp_size, seq_len=args.seq_len)
        check_s = time.perf_counter() - t
        assert [s.name for s in ref.segments] == [s.name for s in program.segments]
        assert [c.bytes for c in ref.cuts] == [c.bytes for c in program.cuts]
        assert [s.cost.flops_fwd for s in ref.segments] == [s.cost.flops_fwd for s in program.segments]
        print(f"check: compile_program end to end took {check_s:.2f} s and gives the same segments, cuts, costs")

    lines = [
        f"## Compile time: Llama-7B shape on meta tensors (L={args.layers}, h=4096, 32 heads, 8 KV heads, "
        f"ffn 11008, V=32000; {n_params / 1e9:.2f} B parameters), seq_len={args.seq_len}, pp_size={args.pp_size}",
        "",
        f"Command: `{command}`. Machine: {os.cpu_count()} cores ({cpu_model()}), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}. "
        f"Load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} (shared machine: wall time "
        f"grows with load; CPU seconds are this process's own).",
        "",
        "| phase | wall s | CPU s |",
        "|---|---:|---:|",
    ]
    lines.append(f"| (import torch + helix_compiler) | {import_s:.2f} | {import_cpu:.2f} |")
    lines.append(f"| (build model under torch.device('meta')) | {build_row[1]:.2f} | {build_row[2]:.2f} |")
    for name, w, c in timer.rows:
        label = name.replace("  of which ", "&nbsp;&nbsp;of which ")
        lines.append(f"| {label} | {w:.2f} | {c:.2f} |")
    lines.append(f"| **compile total** (config .. schedule) | **{total_wall:.2f}** | **{total_cpu:.2f}** |")
    lines += [
        "",
        f"Peak RSS (whole process): {peak / 2**30:.2f} GiB. Target: < {TARGET_S:.0f} s and < "
        f"{TARGET_RSS / 2**30:.0f} GiB: time {'met' if total_wall < TARGET_S else 'NOT met'}, memory "
        f"{'met' if peak < TARGET_RSS else 'NOT met'}. torch.export is {export_wall:.2f} s = "
        f"{100 * export_wall / total_wall:.0f}% of the compile wall time.",
        f"Program: {len(program.segments)} segments; layer 1's cut sends {list(program.cuts[0].crossing)} "
        f"(shipped weights {list(program.cuts[0].shipped_params)}): {program.cuts[0].bytes / 2**30:.2f} GiB "
        f"at b=1, s={args.seq_len}, fp32.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(Path(args.out), "compile_time", body)
        print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
