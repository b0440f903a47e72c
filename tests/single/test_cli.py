"""The ``helix`` command line: offline compile and simulate of built-in shapes."""

from __future__ import annotations

from helix_compiler.cli import main


def test_show_prints_program_and_schedule(capsys):
    assert main(["show", "--layers", "4", "--hidden", "64", "--heads", "4", "--vocab", "256",
                 "--seq-len", "4096", "--pp-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "HelixProgram: 4 layers, pp_size=2, seq_len=4096" in out
    assert "r0|" in out and "r1|" in out and "b:E.0" in out


def test_simulate_writes_timeline_and_trace(tmp_path, capsys):
    png, trace = tmp_path / "t.png", tmp_path / "t.json"
    assert main(["simulate", "--model", "gpt", "--layers", "4", "--hidden", "64", "--heads", "4", "--vocab", "256",
                 "--seq-len", "1024", "--pp-size", "2", "--timeline", str(png), "--trace", str(trace)]) == 0
    assert "bubble ratio" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert trace.read_text().lstrip().startswith(("{", "["))
