"""schedule="auto" (``helix_compiler.tune``), the per-rank memory model (``sim.memory``) and
``helix tune``: the search picks the analytically best candidate on chains with known bubbles,
memory limits exclude exactly what exceeds them, pruning never changes the choice."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from helix_compiler.cli import main
from helix_compiler.config import HelixConfig
from helix_compiler.errors import HelixError
from helix_compiler.ir.segment import chain_specs
from helix_compiler.program import compile_program
from helix_compiler.sim import uniform_chain_costs, unit_device
from helix_compiler.sim.memory import OPTIMIZERS, MemoryModel, optimizer_bytes
from helix_compiler.tune import search_schedules, with_mlp_chunks

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _chain_program(L: int, p: int, **costs):
    """A program-shaped stub over a synthetic chain (no model, no parameters): what the search
    reads (config, layers, specs, costs, segments, captured)."""
    specs = chain_specs(L)
    cost = uniform_chain_costs(L, **costs)
    mod = torch.nn.Module()
    segments = [SimpleNamespace(spec=s, name=s.name, params=[], cost=c) for s, c in zip(specs, cost, strict=True)]
    return SimpleNamespace(config=HelixConfig(pp_size=p, seq_len=64), layers=SimpleNamespace(num_layers=L),
                           specs=specs, costs=cost, segments=segments, passes=[],
                           captured=SimpleNamespace(module=mod, gm=mod, user_fqn=lambda n: n))


def _by_label(choice):
    return {c.candidate.label(): c for c in choice.candidates}


def test_auto_picks_the_analytically_best_schedule_on_a_unit_chain():
    # unit device: durations = FLOPs; attention 4, parameter chunk 1, backward 2x, no comm.
    # Per rank the work is M (L/p) (4 + 1) 3 = 240; bubbles (HELIXPIPE.md 1.5 / 6.1):
    # helix [(p-1) + (F-1)(p-2)] (1 + 2) = 9 (F=1), 15 (F=2); 1F1B and GPipe (p-1)(L/p)(5)(3) = 90;
    # interleaved v=2 (p-1)(L/(p v)) 15 = 45
    L, p, M = 8, 4, 8
    prog = _chain_program(L, p, attn_fwd=4.0, param_fwd=1.0, bwd_factor=2.0)
    choice = search_schedules(prog, device=unit_device(), memory_limit=None, num_microbatches=(M,),
                              mlp_chunks=(None,), head_stages=(None,), exhaustive=True)
    t = {k: c.iteration_time for k, c in _by_label(choice).items()}
    assert t["helix F=1 M=8 rc=none"] == pytest.approx(240 + 9)
    assert t["helix F=2 M=8 rc=none"] == pytest.approx(240 + 15)
    assert t["1f1b M=8 rc=none"] == pytest.approx(240 + 90)
    assert t["gpipe M=8 rc=none"] == pytest.approx(240 + 90)
    assert t["interleaved v=2 M=8 rc=none"] == pytest.approx(240 + 45)
    c = choice.chosen.candidate
    assert (c.schedule, c.num_folds, c.recompute) == ("helix", 1, "none")
    assert choice.runner_up.candidate.label() == "helix F=2 M=8 rc=none"
    # the table is ranked by simulated time; ZB1P is simulated but marked and never chosen
    times = [x.iteration_time for x in choice.simulated]
    assert times == sorted(times)
    zb = [x for x in choice.candidates if x.candidate.schedule == "zb1p"]
    assert zb and not any(x.runnable for x in zb)
    with_zb = search_schedules(prog, device=unit_device(), memory_limit=None, num_microbatches=(M,),
                               mlp_chunks=(None,), schedules=("zb1p", "1f1b"), runnable_only=True)
    assert with_zb.chosen.candidate.schedule == "1f1b"


def test_attention_heavy_chain_makes_one_layer_per_virtual_stage_win_over_1f1b():
    # L/p = 4 layers per rank: interleaved v=4 (one layer per virtual stage) has a quarter of
    # 1F1B's bubble (p-1)(L/p)(t_f+t_b); helix is excluded here: the layer-wise choice
    L, p, M = 8, 2, 4
    prog = _chain_program(L, p, attn_fwd=8.0, param_fwd=1.0)
    choice = search_schedules(prog, device=unit_device(), memory_limit=None, num_microbatches=(M,),
                              mlp_chunks=(None,), schedules=("1f1b", "interleaved", "gpipe"),
                              recompute=("none",), exhaustive=True)
    t = {k: c.iteration_time for k, c in _by_label(choice).items()}
    work = M * (L // p) * 9 * 3
    assert t["1f1b M=4 rc=none"] == pytest.approx(work + (p - 1) * (L // p) * 27)
    assert t["interleaved v=4 M=4 rc=none"] == pytest.approx(work + (p - 1) * 27)
    assert choice.chosen.candidate.label() == "interleaved v=4 M=4 rc=none"


@pytest.fixture(scope="module")
def tiny():
    from helix_compiler.models import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig(num_layers=4, hidden=64, heads=4, kv_heads=2, ffn=128))
    return model, compile_program(model, pp_size=2, seq_len=256, num_microbatches=4)


def test_memory_limit_just_below_a_peak_excludes_that_candidate(tiny):
    _, prog = tiny
    kw = dict(device="H20", num_microbatches=(4,), exhaustive=True)
    free = search_schedules(prog, memory_limit=None, **kw)
    best = free.chosen
    assert best.fits and all(c.fits for c in free.simulated)
    limited = search_schedules(prog, memory_limit=best.peak_memory - 1, **kw)
    rows = _by_label(limited)
    assert not rows[best.candidate.label()].fits
    for c in limited.simulated:
        assert c.fits == (c.peak_memory <= best.peak_memory - 1)
    assert limited.chosen.peak_memory <= best.peak_memory - 1
    assert limited.chosen.iteration_time >= best.iteration_time
    at = search_schedules(prog, memory_limit=best.peak_memory, **kw)  # the limit is inclusive
    assert at.chosen.candidate == best.candidate


@pytest.fixture(scope="module")
def wide():
    """Compute-bound at long sequences (the tiny model is latency-bound: nothing prunes)."""
    from helix_compiler.models import Llama, LlamaConfig

    with torch.device("meta"):
        model = Llama(LlamaConfig(vocab_size=32000, num_layers=8, hidden=1024, heads=8, kv_heads=8, ffn=2816))
    return compile_program(model.to(torch.bfloat16), pp_size=4, seq_len=32768, num_microbatches=8)


def test_pruning_keeps_the_exhaustive_choice_and_its_bounds_hold(wide):
    prog = wide
    kw = dict(device="H20", tokens_per_step=8 * 32768, mlp_chunks=(None, 4))
    full = search_schedules(prog, memory_limit=None, exhaustive=True, **kw)
    for c in full.simulated:  # the busiest rank's compute is a lower bound of the iteration
        assert c.lower_bound <= c.iteration_time * (1 + 1e-12)
    fast = search_schedules(prog, memory_limit=None, **kw)
    assert fast.chosen.candidate == full.chosen.candidate
    assert fast.runner_up.candidate == full.runner_up.candidate
    assert len(fast.simulated) < len(full.simulated)
    assert all(c.lower_bound >= fast.runner_up.iteration_time for c in fast.candidates if not c.simulated)
    # memory pruning: a candidate skipped for its memory bound really is over the limit
    limit = sorted(c.peak_memory for c in full.simulated)[len(full.simulated) // 2]
    pruned = search_schedules(prog, memory_limit=limit, **kw)
    exact = _by_label(search_schedules(prog, memory_limit=limit, exhaustive=True, **kw))
    skipped = [c for c in pruned.candidates if c.memory_bound is not None]
    assert skipped
    for c in skipped:
        assert c.memory_bound > limit
        assert exact[c.candidate.label()].peak_memory >= c.memory_bound * (1 - 1e-12)
    assert pruned.chosen.candidate == exact[pruned.chosen.candidate.label()].candidate
    assert pruned.chosen.iteration_time == min(c.iteration_time for c in exact.values()
                                               if c.simulated and c.fits and c.runnable)


def test_memory_model_counts_what_each_rank_owns(tiny):
    model, prog = tiny
    total = sum(p.numel() for p in model.parameters())
    assert optimizer_bytes("adam_bf16").total == 16 and optimizer_bytes("adam_fp32").total == 16
    assert OPTIMIZERS["adam_fp32"].state == 8  # two fp32 moments, no master copy
    res = prog.simulate(device="H20", optimizer="adam_fp32")
    mem = res.rank_memory
    owned = [m.parameters / 4 for m in mem]
    assert sum(owned) == total  # untied Llama: every parameter on exactly one rank
    for m, act in zip(mem, res.peak_memory_bytes, strict=True):
        assert m.activations == act and m.gradients == m.parameters and m.optimizer == 2 * m.parameters
    assert res.total_peak_memory_bytes == [m.total for m in mem]
    sharded = prog.simulate(device="H20", optimizer="adam_fp32", dp=4, dp_shard=True).rank_memory
    for a, b in zip(mem, sharded, strict=True):
        assert b.parameters == a.parameters and b.gradients == a.gradients / 4 and b.optimizer == a.optimizer / 4
    zero1 = prog.simulate(device="H20", optimizer="adam_fp32", dp=4, dp_shard="optimizer").rank_memory
    for a, b in zip(mem, zero1, strict=True):  # runtime.zero's ZeRO-1: gradients stay whole
        assert b.gradients == a.gradients and b.optimizer == a.optimizer / 4
    with pytest.raises(HelixError, match="dp_shard='zero3'"):
        MemoryModel(prog, dp=2, dp_shard="zero3")
    # tp=2: split weights count their shard (the plan's), replicated ones whole
    plan = prog.tensor_parallel_plan(2)
    split, replicated = plan.bytes_per_rank(1)
    tp_model = MemoryModel(prog, tp=2, optimizer="adam_fp32")
    assert sum(len(n) for n in tp_model.owned(prog.schedule)) == len(dict(model.named_parameters()))
    assert sum(tp_model.numel.values()) == split + replicated
    tp_mem = prog.simulate(device="H20", tp=2, optimizer="adam_fp32").rank_memory
    assert sum(m.parameters for m in tp_mem) == 4 * (split + replicated)


def test_tied_weight_is_held_on_both_ranks_when_the_head_moves():
    from helix_compiler.models import GPT, GPTConfig

    model = GPT(GPTConfig(num_layers=2, hidden=32, heads=2, max_seq_len=64))
    prog = compile_program(model, pp_size=2, seq_len=64, num_microbatches=4, head_stage=1)
    owned = MemoryModel(prog).owned(prog.schedule)
    assert "wte.weight" in owned[0] and "wte.weight" in owned[1]


def test_compile_program_auto_returns_the_chosen_validated_program(tiny, caplog):
    model, _ = tiny
    with caplog.at_level("INFO", logger="helix_compiler.tune"):
        prog = compile_program(model, pp_size=2, seq_len=256, num_microbatches=4, schedule="auto")
    c = prog.choice.chosen.candidate
    assert prog.config.schedule == c.schedule != "auto" and prog.schedule.kind == c.schedule
    assert prog.config.recompute == c.recompute and prog.schedule.num_microbatches == c.num_microbatches
    assert prog.choice.chosen.runnable and prog.choice.runner_up is not None
    assert c.num_microbatches * c.micro_batch_size == 4  # the tokens per step of the call
    assert any("chose" in r.message and "runner-up" in r.message for r in caplog.records)
    sim = prog.simulate(device="H20")
    assert sim.iteration_time == pytest.approx(prog.choice.chosen.iteration_time)
    with pytest.raises(HelixError, match="no runnable candidate fits memory_limit"):
        compile_program(model, pp_size=2, seq_len=256, num_microbatches=4, schedule="auto", memory_limit=1e3)


def test_auto_is_a_valid_schedule_name_and_typos_list_it():
    assert HelixConfig(pp_size=2, seq_len=64, schedule="auto").schedule == "auto"
    with pytest.raises(HelixError, match="'auto'"):
        HelixConfig(pp_size=2, seq_len=64, schedule="autox")


def test_unknown_device_preset_is_an_error_listing_the_presets(tiny):
    _, prog = tiny
    with pytest.raises(HelixError, match=r"unknown device 'H300'; presets are .*'B200'.*'H200'"):
        search_schedules(prog, device="H300")


def test_chunked_mlp_costs_the_same_gemms_plus_the_rerun(tiny):
    _, prog = tiny
    chunked = with_mlp_chunks(prog, 4, recompute=True)
    plain = with_mlp_chunks(prog, 4, recompute=False)
    for a, b, c in zip(prog.segments, chunked.segments, plain.segments, strict=True):
        x, y, z = a.cost.at(1, 256), b.cost.at(1, 256), c.cost.at(1, 256)
        assert y["flops_fwd"] == x["flops_fwd"] == z["flops_fwd"]
        assert z["flops_bwd"] == x["flops_bwd"] and z["saved_bytes[none]"] == x["saved_bytes[none]"]
        if a.spec.kind in ("param", "final"):  # the backward reruns the MLP's forward; nothing [s, ffn] is kept
            mlp = 2 * 256 * 64 * 128 * 3
            assert y["flops_bwd"] == x["flops_bwd"] + mlp
            assert y["saved_bytes[none]"] < x["saved_bytes[none]"]
    assert chunked.config.mlp_chunks == 4 and chunked.config.recompute != "none"
    assert prog.segments[2].gm is not chunked.segments[2].gm  # the compiled program is untouched


# ------------------------------------------------------------------------------ CLI
TINY = ["--layers", "4", "--hidden", "64", "--heads", "4", "--vocab", "256", "--seq-len", "512", "--pp-size", "2"]


def _rows(out: str) -> list[str]:
    # a row: 2 characters of mark ("*" chosen, "2" runner-up), 3 of rank, the candidate, ...
    return [line for line in out.splitlines() if line[2:5].strip().isdigit() and line[:2].strip() in ("", "*", "2")]


def test_cli_tune_prints_a_ranked_table_and_writes_a_picture(tmp_path, capsys):
    png = tmp_path / "tune.png"
    assert main(["tune", *TINY, "--tokens-per-step", "2048", "--picture", str(png)]) == 0
    out = capsys.readouterr().out
    assert "schedule search on H20" in out and "chosen: " in out and "runner-up" in out
    rows = _rows(out)
    # the chosen row is the fastest that fits and runs (faster split-backward ones only simulate)
    assert len(rows) >= 2 and next(r for r in rows if r.rstrip().endswith("yes  yes")).startswith(" *")
    assert sum(r.startswith(" *") for r in rows) == 1
    times = [float(r[66:77]) for r in rows]  # the iteration column (fixed width)
    assert times == sorted(times)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a limit nothing meets: the table still prints, the exit code says so
    assert main(["tune", *TINY, "--memory-limit", "0.000001", "--picture", ""]) == 1
    captured = capsys.readouterr()
    assert "chosen: none" in captured.out and "no runnable candidate fits" in captured.err


def test_cli_tune_unknown_device_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["tune", *TINY, "--device", "H300"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown device preset 'H300'; presets are" in err and "H200" in err and "Traceback" not in err


def test_cli_takes_hugging_face_configs_and_module_functions(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    hf = ["--hf", "llama", "--set", "num_hidden_layers=2", "--set", "hidden_size=64", "--set",
          "intermediate_size=128", "--set", "num_attention_heads=4", "--set", "num_key_value_heads=2",
          "--set", "vocab_size=256"]
    assert main(["show", *hf, "--seq-len", "256", "--pp-size", "2"]) == 0
    assert "HelixProgram: 2 layers, pp_size=2, seq_len=256" in capsys.readouterr().out
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 64,
                               "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "vocab_size": 256}))
    assert main(["simulate", "--hf-config", str(cfg), "--set", "num_hidden_layers=4", "--seq-len", "256",
                 "--pp-size", "2", "--device", "h200"]) == 0
    out = capsys.readouterr().out
    assert "on H200" in out and "peak memory" in out and "optimizer state" in out
    (tmp_path / "my_models.py").write_text(
        "from helix_compiler.models import Llama, LlamaConfig\n"
        "def small():\n    return Llama(LlamaConfig(num_layers=2, hidden=64, heads=4, kv_heads=2, ffn=128))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["tune", "--module", "my_models:small", "--seq-len", "256", "--pp-size", "2",
                 "--schedules", "helix,1f1b", "--picture", ""]) == 0
    assert "chosen: " in capsys.readouterr().out
    assert main(["show", "--hf", "no_such_model_type", "--seq-len", "256"]) == 2
    assert "Hugging Face model type 'no_such_model_type'" in capsys.readouterr().err
    assert main(["show", "--module", "my_models:missing", "--seq-len", "256"]) == 2
    assert "cannot load it" in capsys.readouterr().err


def test_cli_simulate_warns_when_parameters_and_optimizer_state_exceed_the_device(capsys):
    # 3B-parameter embedding and head at 256 tokens: tiny activations, 16 bytes per parameter;
    # both on rank 0 (--head-stage 0: the default would move this untied head to rank 1)
    args = ["simulate", "--layers", "2", "--hidden", "2048", "--heads", "16", "--vocab", "1500000",
            "--seq-len", "256", "--pp-size", "2", "--device", "A800", "--head-stage", "0"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    acts = [float(line.split("peak activations ")[1].split()[0]) for line in out.splitlines()
            if "peak activations" in line]
    assert max(acts) < 80
    warnings = [line for line in err.splitlines() if line.startswith("warning: rank ")]
    assert warnings and all("optimizer state" in w and "exceed the A800's 80.000 GB" in w for w in warnings)


def test_cli_simulate_takes_every_compile_option(capsys):
    args = ["simulate", *TINY, "--schedule", "interleaved", "--virtual-stages", "2", "--microbatches", "4",
            "--folds", "1", "--mlp-chunks", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "interleaved: p=2 M=4" in out
    assert main(["simulate", *TINY, "--head-stage", "1", "--microbatches", "4"]) == 0
    assert "helix: p=2" in capsys.readouterr().out
