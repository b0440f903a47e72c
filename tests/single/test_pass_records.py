"""``compile_program`` records every pass it runs (``program.passes``): name, wall time and
FX node counts, which must equal the graphs the passes produce when run one by one."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from models_for_tests import build

from helix_compiler import compile_program
from helix_compiler.capture import capture
from helix_compiler.ir.program import PassRecord
from helix_compiler.passes.attention import canonicalize_attention
from helix_compiler.passes.cut import cut_attention
from helix_compiler.passes.layers import tag_layers
from helix_compiler.passes.mlp_chunk import chunk_mlp
from helix_compiler.passes.segment import build_segments

ROOT = Path(__file__).resolve().parents[2]
SEQ = 32
PASSES = ["capture", "canonicalize_attention", "tag_layers", "cut_attention", "build_segments",
          "chunk_mlp", "segment_cost", "build_schedule"]


def nodes(*gms) -> int:
    return sum(len(gm.graph.nodes) for gm in gms)


def counts_pass_by_pass(name: str, mlp_chunks: int | None) -> list[int]:
    """FX node counts after each graph pass, running the passes by hand on a fresh model."""
    model, loss_fn = build(name)
    captured = capture(model, seq_len=SEQ, loss_fn=loss_fn)
    gm = captured.gm
    out = [nodes(gm)]
    canonicalize_attention(gm)
    out.append(nodes(gm))
    _, layers = tag_layers(gm)
    out.append(nodes(gm))
    cut_attention(gm, to_expr=captured.to_cost_expr, seq_len=SEQ, micro_batch_size=1)
    out.append(nodes(gm))
    segments = build_segments(gm, num_layers=layers.num_layers, to_expr=captured.to_cost_expr)
    out.append(nodes(*(s.gm for s in segments)))
    if mlp_chunks:
        for s in segments:
            if s.spec.kind in ("param", "final"):
                chunk_mlp(s.gm, num_chunks=mlp_chunks, recompute=True)
        out.append(nodes(*(s.gm for s in segments)))
    return out


@pytest.mark.parametrize("name,mlp_chunks", [("gpt_explicit", None), ("llama", 2)])
def test_every_pass_is_recorded_in_order_with_its_node_counts(name, mlp_chunks):
    model, loss_fn = build(name)
    t0 = time.perf_counter()
    program = compile_program(model, pp_size=2, seq_len=SEQ, loss_fn=loss_fn, mlp_chunks=mlp_chunks)
    wall = time.perf_counter() - t0
    recs = program.passes
    assert all(isinstance(r, PassRecord) for r in recs)
    assert [r.name for r in recs] == [p for p in PASSES if mlp_chunks or p != "chunk_mlp"]
    # each pass starts from the graph the previous one left; capture starts from nothing
    assert recs[0].nodes_before == 0
    for prev, cur in zip(recs, recs[1:], strict=False):
        assert cur.nodes_before == prev.nodes_after, (prev, cur)
    # the counts are those of the graphs the passes make, run one by one
    graph_passes = [r for r in recs if r.name not in ("segment_cost", "build_schedule")]
    assert [r.nodes_after for r in graph_passes] == counts_pass_by_pass(name, mlp_chunks)
    assert recs[-1].nodes_after == nodes(*(s.gm for s in program.segments))
    assert nodes(program.captured.gm) == next(r.nodes_after for r in recs if r.name == "cut_attention")
    by_name = {r.name: r for r in recs}
    if name == "gpt_explicit":  # matmul-softmax-matmul becomes one helix::attention per layer
        c = by_name["canonicalize_attention"]
        assert c.nodes_after < c.nodes_before
    if mlp_chunks:
        c = by_name["chunk_mlp"]
        # each MLP region becomes one chunked call: fewer nodes
        assert c.nodes_after < c.nodes_before and c.detail == "2 chunks"
    assert by_name["build_segments"].detail == f"{len(program.segments)} segments"
    n_instrs = sum(len(p) for p in program.schedule.programs)
    assert by_name["build_schedule"].detail == (f"{n_instrs} instructions; head on stage "
                                                f"{program.schedule.head_stage}")  # the default rule's pick
    assert all(r.wall_s >= 0 and r.cpu_s >= 0 for r in recs) and sum(r.wall_s for r in recs) <= wall
    # printed with the program
    report = program.pass_report()
    assert report.splitlines()[1:-1] == [str(r) for r in recs]
    text = str(program)
    assert "\npasses:\n" in text and all(f"  {r}" in text for r in recs)


def test_compile_time_benchmark_reports_the_pass_records():
    """benchmarks/compile_time.py, run as a user runs it (a small shape), prints one table
    row per pass, in compile_program's order."""
    cmd = [sys.executable, "benchmarks/compile_time.py", "--layers", "2", "--seq-len", "4096",
           "--pp-size", "2", "--no-write"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in res.stdout.splitlines() if line.startswith("| ")]
    names = [r for r in rows if r in PASSES]
    assert names == [p for p in PASSES if p != "chunk_mlp"], rows
    assert "of which torch.export" in res.stdout and "Peak RSS" in res.stdout
