"""The default helix head placement (issue 11): a large untied head leaves stage 0 for the
stage the cost model balances (``head_stage="auto"``); a small or tied head stays with the
embedding; an explicit ``head_stage`` is honoured (``lowering.placement.default_head_stage``)."""

from __future__ import annotations

import pytest
import torch

from helix_compiler import compile_program
from helix_compiler.cli import main
from helix_compiler.lowering.placement import choose_head_stage, default_head_stage
from helix_compiler.models import GPT, GPTConfig, Llama, LlamaConfig

SEQ = 32


def _llama(vocab: int, layers: int = 6) -> torch.nn.Module:
    with torch.device("meta"):
        return Llama(LlamaConfig(vocab_size=vocab, num_layers=layers, hidden=64, heads=4, kv_heads=2, ffn=172))


def _pick(program) -> int:
    c = program.config
    return choose_head_stage(program.specs, program.costs, num_stages=c.pp_size,
                             num_microbatches=c.num_microbatches, num_folds=c.num_folds,
                             micro_batch_size=c.micro_batch_size, seq_len=c.seq_len)


def test_the_rule_compares_the_untied_head_with_half_a_mean_layer():
    assert default_head_stage(head_elements=50, mean_layer_elements=100)[0] == "auto"
    assert default_head_stage(head_elements=49, mean_layer_elements=100)[0] == 0
    assert default_head_stage(head_elements=0, mean_layer_elements=100)[0] == 0  # tied: nothing of its own
    stage, reason = default_head_stage(head_elements=262144, mean_layer_elements=45440)
    assert stage == "auto" and "262144" in reason and "5.77x" in reason


def test_a_large_untied_vocabulary_moves_the_head_to_the_least_loaded_stage():
    """vocab 4096 x h=64 = 262144 head elements against a 45440-element layer: off stage 0,
    onto the stage ``choose_head_stage`` picks (L=6 on p=4: a stage with one chunk less)."""
    program = compile_program(_llama(4096), pp_size=4, seq_len=SEQ)
    assert program.config.head_stage is None  # the option stays unset: the rule resolved it
    assert program.schedule.head_stage == _pick(program) != 0
    assert program.schedule.head_stage == 2
    assert "head_stage='auto'" in program.head_stage_reason
    assert f"head on stage {program.schedule.head_stage}" in str(program)
    assert "head on stage 2" in program.passes[-1].detail  # the build_schedule record
    # the same as asking for "auto", instruction for instruction
    auto = program.reschedule(head_stage="auto")
    assert auto.schedule.to_text() == program.schedule.to_text()
    assert auto.head_stage_reason == "head_stage='auto' given"
    # rescheduling keeps the rule (num_folds changes the loads, not the rule's verdict)
    assert program.reschedule(num_folds=1, num_microbatches=4).schedule.head_stage != 0


def test_explicit_stage_zero_is_honoured():
    program = compile_program(_llama(4096), pp_size=4, seq_len=SEQ, head_stage=0)
    assert program.schedule.head_stage == 0
    assert program.head_stage_reason == "head_stage=0 given"
    assert compile_program(_llama(4096), pp_size=4, seq_len=SEQ, head_stage=3).schedule.head_stage == 3


def test_a_small_vocabulary_stays_on_stage_zero():
    """vocab 256 x 64 = 16384 elements, 0.36 of a layer: with the embedding."""
    program = compile_program(_llama(256), pp_size=4, seq_len=SEQ)
    assert program.schedule.head_stage == 0 and _pick(program) != 0
    assert "stage 0 (with the embedding)" in program.head_stage_reason


def test_a_tied_head_stays_on_stage_zero_however_large():
    """GPT ties lm_head to wte: moving it would duplicate the embedding on another stage."""
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=8192, max_seq_len=64, num_layers=4, hidden=64, heads=4))
    program = compile_program(model, pp_size=2, seq_len=SEQ)
    assert program.schedule.head_stage == 0
    assert "0 elements" in program.head_stage_reason


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_layerwise_schedules_are_untouched(schedule):
    program = compile_program(_llama(4096, layers=4), pp_size=2, seq_len=SEQ, schedule=schedule,
                              num_microbatches=4, num_folds=1)
    assert program.head_stage_reason is None


def test_the_search_keeps_an_explicit_stage_zero_candidate():
    """tune's candidates mean what they meant: ``0`` is the head with the embedding, never the
    default rule (which would put this head elsewhere)."""
    from helix_compiler.tune import search_schedules

    program = compile_program(_llama(4096, layers=4), pp_size=2, seq_len=SEQ, num_microbatches=4)
    choice = search_schedules(program, memory_limit=None, schedules=("helix",), folds=(2,),
                              recompute=("none",), mlp_chunks=(None,), num_microbatches=(4,), exhaustive=True)
    heads = sorted(c.candidate.head_stage for c in choice.simulated)
    assert heads == [0, 1]
    zero = next(c.candidate for c in choice.simulated if c.candidate.head_stage == 0)
    assert zero.options()["head_stage"] == 0
    assert program.reschedule(**{k: v for k, v in zero.options().items()
                                 if k in ("schedule", "num_folds", "head_stage")}).schedule.head_stage == 0


def test_helix_show_prints_the_resolved_head_stage(capsys):
    assert main(["show", "--model", "llama", "--layers", "4", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
                 "--ffn", "172", "--vocab", "4096", "--seq-len", "64", "--pp-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "head on stage 1: default:" in out
    assert main(["show", "--model", "llama", "--layers", "4", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
                 "--ffn", "172", "--vocab", "4096", "--seq-len", "64", "--pp-size", "2", "--head-stage", "0"]) == 0
    assert "head on stage 0: head_stage=0 given" in capsys.readouterr().out
