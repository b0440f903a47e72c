"""Segments: the chain E, A1, P1, ..., AL, PL, H reproduces the model exactly."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ast  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from models_for_tests import (  # noqa: E402
    ALL_MODELS,
    NUM_LAYERS,
    batch,
    compiled,
    concrete_shape,
    float64_reference,
    loss_and_grads,
    max_grad_err,
    rel_err,
)

from helix_compiler.passes.segment import run_chain  # noqa: E402

HELIX_ATTENTION = torch.ops.helix.attention.default
LONG = 8192  # the cut ships W_qkv (GPT) / W_q, W_k, W_v (Llama) to the attention stage
CASES = [(name, 32) for name in ALL_MODELS] + [("gpt", LONG), ("llama", LONG), ("hf_llama_sdpa", LONG)]


def _expected_chain(num_layers):
    names, kinds = ["E"], ["embed"]
    for layer in range(1, num_layers + 1):
        names += [f"A{layer}", f"P{layer}"]
        kinds += ["attn", "final" if layer == num_layers else "param"]
    return names + ["H"], kinds + ["head"]


@pytest.mark.parametrize("name, num_layers", [("gpt", NUM_LAYERS), ("llama", 3)])
def test_chain_names_kinds_and_code(name, num_layers):
    _, _, program = compiled(name, num_layers=num_layers)
    names, kinds = _expected_chain(num_layers)
    assert [s.name for s in program.segments] == names
    assert [s.spec.kind for s in program.segments] == kinds
    assert [s.spec.index for s in program.segments] == list(range(len(names)))
    for seg in program.segments:
        seg.gm.graph.lint()
        code = seg.code
        tree = ast.parse(code)  # readable Python: parses, one forward(self, <chain>, <user inputs>)
        (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert fn.name == "forward"
        assert [a.arg for a in fn.args.args] == ["self", *[p.name for p in seg.gm.graph.nodes if p.op == "placeholder"]]
        n_placeholders = len(seg.chain_inputs) + len(seg.user_inputs)
        assert len(fn.args.args) == 1 + n_placeholders
        n_attn = sum(n.target == HELIX_ATTENTION for n in seg.gm.graph.nodes)
        assert n_attn == (1 if seg.spec.kind == "attn" else 0), seg.name
        assert ("torch.ops.helix.attention.default" in code) == (seg.spec.kind == "attn")
    head = program.segments[-1]
    (out,) = [n for n in head.gm.graph.nodes if n.op == "output"]
    (loss,) = out.args[0]
    assert head.chain_outputs == [loss.name] and loss.target == torch.ops.aten.cross_entropy_loss.default


@pytest.mark.parametrize("name, seq_len", CASES)
def test_run_chain_reproduces_loss_and_every_grad(name, seq_len):
    model, loss_fn, program = compiled(name, seq_len)
    reference = float64_reference(name, model)
    inputs = batch(2, 24, seed=21)
    ref_loss, ref_grads = loss_and_grads(reference, loss_fn, dict(reference.named_parameters()), inputs)
    params = dict(model.named_parameters())
    loss = run_chain(program.segments, inputs)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True), strict=True))
    assert rel_err(loss, ref_loss) <= 1e-12, (loss.item(), ref_loss.item())
    err, where = max_grad_err(grads, ref_grads)  # also fails on a missing (None) gradient
    assert err <= 1e-12, f"grad of {where}: relative error {err:.3g}"
    if reference is model and name in ("gpt", "llama", "hf_llama_sdpa", "hf_gpt2_sdpa"):
        assert torch.equal(loss, ref_loss)  # same kernels in the same order: bitwise


@pytest.mark.parametrize("name, seq_len", [("gpt", 32), ("gpt", LONG), ("llama", LONG), ("hf_qwen2_sdpa", 32)])
def test_parameters_are_the_users_own_objects(name, seq_len):
    model, _, program = compiled(name, seq_len)
    cap = program.captured
    user = dict(model.named_parameters())
    seen = set()
    for seg in program.segments:
        for fqn in seg.params:
            assert seg.gm.get_parameter(fqn) is user[cap.user_fqn(fqn)], (seg.name, fqn)
            seen.add(cap.user_fqn(fqn))
        seen |= {cap.user_fqn(p) for p in seg.shipped_params}
    assert seen == set(user), f"parameters used by no segment: {set(user) - seen}"


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_attention_segments_receive_shipped_weights_at_long_seq(name):
    model, _, program = compiled(name, LONG)
    cap = program.captured
    user = dict(model.named_parameters())
    segs = program.segments
    inputs = batch(2, 16, seed=4)
    carried = ()
    for i, seg in enumerate(segs):
        outs = seg.gm(*carried, *(inputs[n] for n in seg.user_inputs))
        assert len(outs) == len(seg.chain_outputs)
        for (shape, dtype), t in zip(seg.output_meta, outs, strict=True):  # declared boundary shapes are right
            assert list(t.shape) == concrete_shape(shape, 2, 16) and t.dtype == dtype, seg.name
        if i + 1 < len(segs) and segs[i + 1].spec.kind == "attn":
            nxt = segs[i + 1]
            cut = program.cuts[nxt.spec.layer - 1]
            assert nxt.shipped_params and set(nxt.shipped_params) == set(cut.shipped_params)
            assert nxt.params == [], f"{nxt.name} holds parameters locally: {nxt.params}"
            by_name = dict(zip(seg.chain_outputs, outs, strict=True))
            for fqn in nxt.shipped_params:
                ph = fqn.replace(".", "_")
                assert ph in nxt.chain_inputs
                # the weight travels as the user's nn.Parameter itself (its grad flows back to it)
                assert by_name[ph] is user[cap.user_fqn(fqn)], fqn
        carried = outs
    assert carried[0].dim() == 0


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_attention_segments_hold_no_weights_at_short_seq(name):
    _, _, program = compiled(name, 32)
    for seg in program.segments:
        if seg.spec.kind == "attn":
            assert seg.shipped_params == [] and seg.params == []
            assert not any(n.op == "get_attr" for n in seg.gm.graph.nodes if "weight" in str(n.target))
