"""The tensor-parallel plan: Megatron's column / row layout read off the captured graph, with
GQA heads split or replicated, Conv1D ([in, out]) weights, fused q/k/v, and named rejections."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from helix_compiler import UnsupportedModelError, compile_program  # noqa: E402
from helix_compiler.cli import main  # noqa: E402
from helix_compiler.models import GPT, GPTConfig, Llama, LlamaConfig, hf_model  # noqa: E402


def _roles(plan, layer=1):
    return {p.name.rsplit(".", 2)[-2] + "." + p.name.rsplit(".", 1)[-1]: (p.role, p.shape, p.shard)
            for p in plan.params if p.layer == layer}


@pytest.fixture(scope="module")
def hf_llama():
    return compile_program(hf_model("llama", num_layers=2), pp_size=2, seq_len=32)


def test_llama_gqa_split_and_replicated(hf_llama):
    plan = hf_llama.tensor_parallel_plan(2)
    r = _roles(plan)
    assert r["q_proj.weight"] == ("column q", (64, 64), (32, 64))
    assert r["k_proj.weight"] == ("column k/v", (32, 64), (16, 64))  # 2 K/V heads, one per rank
    assert r["o_proj.weight"] == ("row attention-out", (64, 64), (64, 32))
    assert r["gate_proj.weight"][0] == r["up_proj.weight"][0] == "column mlp-in"
    assert r["down_proj.weight"] == ("row mlp-out", (64, 172), (64, 86))
    assert {p.role for p in plan.params if "norm" in p.name or "embed" in p.name} == {"replicated"}
    four = hf_llama.tensor_parallel_plan(4)  # more ranks than K/V heads: each K/V head on 2 ranks
    assert four.kv_replicas == 2 and _roles(four)["k_proj.weight"][2] == (16, 64)
    assert _roles(four)["q_proj.weight"][2] == (16, 64)
    assert "each of the 2 K/V heads replicated on 2 ranks" in four.describe()
    with pytest.raises(UnsupportedModelError, match="tp=3 does not divide the 4 query heads"):
        hf_llama.tensor_parallel_plan(3)


def test_every_shard_times_its_ranks_is_the_whole(hf_llama):
    for tp in (1, 2, 4):
        for p in hf_llama.tensor_parallel_plan(tp).params:
            if p.split_dim is not None:
                ranks = p.shape[p.split_dim] // p.shard[p.split_dim]
                assert ranks in (tp, tp // hf_llama.tensor_parallel_plan(tp).kv_replicas), p


def test_conv1d_and_fused_qkv_layouts():
    hf_gpt2 = compile_program(hf_model("gpt2", num_layers=2), pp_size=2, seq_len=32).tensor_parallel_plan(2)
    r = _roles(hf_gpt2)
    assert r["c_attn.weight"] == ("column fused qkv", (64, 192), (64, 96))  # Conv1D: [in, out]
    assert r["c_attn.bias"] == ("column fused qkv", (192,), (96,))
    assert r["c_proj.weight"][0] in ("row attention-out", "row mlp-out")
    assert not any(p.name == "lm_head.weight" for p in hf_gpt2.params)  # tied to wte: planned once
    gpt = compile_program(GPT(GPTConfig(num_layers=2)), pp_size=2, seq_len=32).tensor_parallel_plan(2)
    r = _roles(gpt)
    assert r["c_attn.weight"] == ("column fused qkv", (192, 64), (96, 64))  # linear: [out, in]
    assert r["c_fc.weight"] == ("column mlp-in", (256, 64), (128, 64))
    assert r["c_fc.bias"] == ("column mlp-in", (256,), (128,))


def test_kv_heads_that_neither_split_nor_replicate_are_rejected():
    program = compile_program(Llama(LlamaConfig(num_layers=2, heads=6, kv_heads=3, hidden=48, ffn=96)),
                              pp_size=2, seq_len=16)
    with pytest.raises(UnsupportedModelError, match="tp=2 and the 3 K/V heads"):
        program.tensor_parallel_plan(2)
    assert program.tensor_parallel_plan(3).kv_replicas == 1


def test_helix_show_prints_the_plan(capsys):
    assert main(["show", "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--vocab", "256",
                 "--seq-len", "1024", "--pp-size", "2", "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "tensor parallel plan, tp=2: 2 of 4 query heads per rank" in out
    assert "column q" in out and "row mlp-out" in out


def test_a_feature_count_tp_does_not_divide_is_named():
    program = compile_program(Llama(LlamaConfig(num_layers=2, heads=6, kv_heads=3, hidden=48, ffn=100)),
                              pp_size=2, seq_len=16)
    with pytest.raises(UnsupportedModelError, match=r"gate_proj.weight \[100, 48\] cannot be split 3 ways"):
        program.tensor_parallel_plan(3)
