"""The ``helix`` command line: offline compile and simulate of built-in shapes."""

from __future__ import annotations

import pytest

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


def test_unknown_device_is_a_usage_error_listing_the_presets(capsys, monkeypatch):
    import helix_compiler.program as program_mod

    def must_not_compile(*a, **k):
        raise AssertionError("compiled before checking --device")

    monkeypatch.setattr(program_mod, "compile_program", must_not_compile)
    with pytest.raises(SystemExit) as e:
        main(["simulate", "--device", "H300", "--layers", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown device preset 'H300'; presets are H20, H100, A800, H200, B200" in err
    assert "Traceback" not in err


def test_user_errors_are_one_line_not_a_traceback(capsys):
    # 6 micro batches for pp_size=2, F=2 is invalid: HelixError from the compiler, exit 2
    assert main(["show", "--layers", "2", "--hidden", "64", "--heads", "4", "--vocab", "256",
                 "--seq-len", "256", "--pp-size", "2", "--microbatches", "6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("helix show: error: ") and "num_microbatches=6" in err


def test_simulate_warns_when_peak_memory_exceeds_the_device(capsys):
    args = ["simulate", "--layers", "2", "--hidden", "512", "--heads", "4", "--vocab", "1000",
            "--pp-size", "2", "--recompute", "none"]
    assert main([*args, "--seq-len", "524288", "--device", "a800"]) == 0  # presets: any case
    out, err = capsys.readouterr()
    peaks = [float(line.split("peak activations ")[1].split()[0]) for line in out.splitlines()
             if "peak activations" in line]
    over = [r for r, gb in enumerate(peaks) if gb > 80]
    assert over, peaks  # the shape is chosen to exceed the A800's 80 GB
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert [int(w.split("rank ")[1].split(":")[0]) for w in warnings] == over
    assert all("exceed the A800's 80.000 GB of memory" in w for w in warnings)
    # the same program on a B200 (192 GB) fits: no warning
    assert main([*args, "--seq-len", "524288", "--device", "B200"]) == 0
    out, err = capsys.readouterr()
    assert "on B200" in out and max(float(line.split("peak activations ")[1].split()[0])
                                    for line in out.splitlines() if "peak activations" in line) < 192
    assert "warning" not in err


def _iteration(out: str) -> float:
    return float(out.split("iteration ")[1].split(" s")[0])


def test_simulate_with_packed_documents_costs_attention_per_document(capsys):
    base = ["simulate", "--layers", "4", "--hidden", "64", "--heads", "4", "--vocab", "256",
            "--seq-len", "8192", "--pp-size", "2"]
    assert main(base) == 0
    plain = _iteration(capsys.readouterr().out)
    assert main([*base, "--documents", "2048,2048,2048,2048"]) == 0
    packed = _iteration(capsys.readouterr().out)
    assert packed < plain  # four 2k documents: about a quarter of the attention work
    assert main([*base, "--documents", "2048,2048"]) == 2
    assert "must be positive ints summing to seq_len=8192" in capsys.readouterr().err
