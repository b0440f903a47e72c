"""benchmarks/simulate_paper.py: its analytic GPT costs and its BENCHMARKS.md section."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("simulate_paper",
                                                  ROOT / "benchmarks" / "simulate_paper.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["simulate_paper"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_analytic_costs_match_the_standard_gpt_flop_formula(bench):
    L, h, a, V, s = 4, 256, 8, 1000, 512
    costs = bench.analytic_gpt_costs(L, h, a, V)
    assert len(costs) == 2 * L + 2
    total = sum(c.at(1, s)["flops_fwd"] + c.at(1, s)["flops_bwd"] for c in costs)
    # model FLOPs per sequence (dense attention): 72 L s h^2 (1 + s/(6h) + V/(12hL))
    assert total == pytest.approx(72 * L * s * h * h * (1 + s / (6 * h) + V / (12 * h * L)))
    a1 = costs[1].at(2, s)
    assert a1["attention_flops_fwd"] == 4 * 2 * s * s * h
    assert a1["flops_bwd_input"] + a1["flops_bwd_weight"] == a1["flops_bwd"]
    # HELIXPIPE.md 1.4: the A-bundle is 2sbh + 3h^2 + 3h elements, the F2 hop 2sbh
    assert costs[2].at(1, s)["out_bytes"] == 2 * (2 * s * h + 3 * h * h + 3 * h)
    assert a1["out_bytes"] == 2 * 2 * (2 * s * h)
    # recompute without attention reruns the QKV GEMM only, never attention
    assert a1["recompute_flops[without_attention]"] == 6 * 2 * s * h * h


def test_write_benchmarks_keeps_other_sections(bench, tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    bench.write_benchmarks(path, "first")
    text = path.read_text()
    assert bench.START in text and "first" in text
    path.write_text("# Benchmarks\n\n## other\nkeep me\n\n" + text.split("\n", 1)[1] + "\nafter\n")
    bench.write_benchmarks(path, "second")
    text = path.read_text()
    assert "keep me" in text and "after" in text and "second" in text and "first" not in text
    assert text.count(bench.START) == 1


def test_small_run_as_users_run_it(tmp_path):
    """``python benchmarks/simulate_paper.py`` in a fresh process (its ``__main__`` block, as
    a user runs it: a function defined after that block fails here, unlike in-process calls)."""
    out = tmp_path / "B.md"
    args = ["--seq", "4096", "--stages", "2", "--layers", "4", "--hidden", "256", "--heads",
            "4", "--vocab", "1000", "--microbatches-per-stage", "2", "--no-sensitivity",
            "--out", str(out)]
    res = subprocess.run([sys.executable, "benchmarks/simulate_paper.py", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    assert "| 4k | 2 | 4 |" in text and "vs ZB1P" in text and "Notes." in text
    assert f"wrote {out}" in res.stdout


def test_traced_costs_need_the_front_end(bench, monkeypatch):
    import helix_compiler

    monkeypatch.delattr(helix_compiler, "compile_program", raising=False)
    with pytest.raises(SystemExit, match="compile_program"):
        bench.traced_gpt_costs(2, 64, 2, 100)


def test_traced_costs_from_the_front_end(bench, tmp_path):
    import helix_compiler

    if getattr(helix_compiler, "compile_program", None) is None:
        pytest.skip("front end (compile_program) not available")
    specs, costs = bench.traced_gpt_costs(2, 64, 2, 100)
    assert [s.name for s in specs] == ["E", "A1", "P1", "A2", "P2", "H"]
    args = ["--costs", "traced", "--seq", "2048", "--stages", "2", "--layers", "2", "--hidden",
            "64", "--heads", "2", "--vocab", "100", "--microbatches-per-stage", "2",
            "--no-sensitivity", "--out", str(tmp_path / "B.md")]
    assert bench.main(args) == 0
    assert "| 2k | 2 | 4 |" in (tmp_path / "B.md").read_text()
