"""Attention canonicalization: every attention becomes one ``helix::attention(q, k, v)``."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from models_for_tests import (  # noqa: E402
    ALL_MODELS,
    HEADS,
    HIDDEN,
    NUM_LAYERS,
    band_mask,
    batch,
    bidirectional_mask,
    build,
    compiled,
    float64_reference,
    kv_heads_of,
    loss_and_grads,
    masked_gpt,
    max_grad_err,
    padding_mask,
    rel_err,
    seq_dims,
    sliding_window_mask,
    tensor_vals,
)

from helix_compiler import UnsupportedModelError  # noqa: E402
from helix_compiler.capture import capture  # noqa: E402
from helix_compiler.ir import meta  # noqa: E402
from helix_compiler.passes.attention import canonicalize_attention  # noqa: E402

aten = torch.ops.aten
HELIX_ATTENTION = torch.ops.helix.attention.default
GONE = {aten.scaled_dot_product_attention.default, aten.softmax.int, aten._softmax.default,
        aten._safe_softmax.default, aten._scaled_dot_product_flash_attention_for_cpu.default}


def _attentions(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == HELIX_ATTENTION]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_canonical_graph_structure(name):
    _, _, program = compiled(name)
    cap = program.captured
    gm = cap.gm
    gm.graph.lint()
    attns = _attentions(gm)
    assert len(attns) == NUM_LAYERS
    left = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function" and n.target in GONE})
    assert not left, f"attention ops left in the canonical graph: {left}"
    for n in gm.graph.nodes:  # no s x s value anywhere: mask subgraphs and score matrices are gone
        for v in tensor_vals(n):
            assert seq_dims(v, cap.to_cost_expr) <= 1, f"{n.format_node()} has shape {tuple(v.shape)}"
    for n in attns:
        q, k, v = (a.meta["val"] for a in n.args)
        assert n.kwargs["causal"] is True and n.meta[meta.ATTENTION_CAUSAL] is True
        assert n.kwargs["scale"] == pytest.approx(1 / math.sqrt(HIDDEN // HEADS), rel=1e-15)
        assert q.shape[1] == HEADS
        assert k.shape[1] == v.shape[1] == kv_heads_of(name), "GQA repeat of K/V was not peeled off"
        for t in (q, k, v):
            assert t.dim() == 4 and seq_dims(t, cap.to_cost_expr) == 1


@pytest.mark.parametrize("name", ALL_MODELS)
def test_canonical_graph_matches_model_in_float64(name):
    model, loss_fn, program = compiled(name)
    reference = float64_reference(name, model)
    inputs = batch(2, 24, seed=11)
    ref_loss, ref_grads = loss_and_grads(reference, loss_fn, dict(reference.named_parameters()), inputs)
    params = dict(model.named_parameters())
    loss = program.captured.gm(inputs["input_ids"], inputs["labels"])
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    assert rel_err(loss, ref_loss) <= 1e-12, (loss.item(), ref_loss.item())
    err, where = max_grad_err(grads, ref_grads)
    assert err <= 1e-12, f"grad of {where}: relative error {err:.3g}"


@pytest.mark.parametrize("name", ["hf_llama_eager", "hf_qwen2_eager"])
def test_hf_eager_float32_softmax_is_the_only_difference(name):
    """HF eager Llama/Qwen2 run their softmax in float32; the canonical graph computes it in
    float64, so against the unmodified eager model it agrees to float32 softmax accuracy only."""
    model, loss_fn, program = compiled(name)
    inputs = batch(2, 24, seed=11)
    params = dict(model.named_parameters())
    ref_loss, ref_grads = loss_and_grads(model, loss_fn, params, inputs)
    loss = program.captured.gm(inputs["input_ids"], inputs["labels"])
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    assert rel_err(loss, ref_loss) <= 1e-7
    err, _ = max_grad_err(grads, ref_grads)
    assert 1e-12 < err <= 1e-5, err  # > 1e-12: the float32 step is really in the original


def test_canonicalize_pass_directly():
    model, _ = build("gpt_explicit")
    cap = capture(model, seq_len=32)
    n_softmax = sum(n.target == aten.softmax.int for n in cap.gm.graph.nodes)
    n_tril = sum(n.target == aten.tril.default for n in cap.gm.graph.nodes)
    assert n_softmax == NUM_LAYERS and n_tril >= 1
    result = canonicalize_attention(cap.gm)
    assert result.changed and result.info["count"] == NUM_LAYERS
    assert not any(n.target in (aten.tril.default, aten.masked_fill.Scalar) for n in cap.gm.graph.nodes)
    assert "torch.ops.helix.attention.default" in cap.gm.code
    inputs = batch(2, 16, seed=5)
    assert rel_err(cap.gm(inputs["input_ids"], inputs["labels"]), model(inputs["input_ids"], inputs["labels"])) <= 1e-13


def _node_named_in(msg: str, target: str) -> bool:
    return re.search(rf"%{target}\w* : ", msg) is not None


@pytest.mark.parametrize("mask_fn, explicit, node", [
    (padding_mask, False, "scaled_dot_product_attention"),
    (bidirectional_mask, False, "scaled_dot_product_attention"),
    (band_mask(4, hole=(20, 18)), False, "scaled_dot_product_attention"),
    (band_mask(4, hole=(20, 18)), True, "masked_fill"),
    (padding_mask, True, "masked_fill"),
])
def test_non_causal_masks_are_rejected_naming_the_node(mask_fn, explicit, node):
    model = masked_gpt(mask_fn, explicit=explicit)
    cap = capture(model, seq_len=32)
    with pytest.raises(UnsupportedModelError, match="uses a mask helix_compiler cannot pipeline") as info:
        canonicalize_attention(cap.gm)
    assert _node_named_in(str(info.value), node), str(info.value)


def test_causal_mask_through_the_same_path_is_accepted():
    """Control for the rejections above: the same model with a causal mask canonicalizes and
    stays numerically equal, so the rejections are about the mask, not the model."""
    for explicit in (False, True):
        model = masked_gpt(lambda ids, t: torch.ones(t, t, dtype=torch.bool, device=ids.device).tril(),
                           explicit=explicit)
        cap = capture(model, seq_len=32)
        assert canonicalize_attention(cap.gm).info["count"] == NUM_LAYERS
        assert all(n.kwargs["causal"] for n in _attentions(cap.gm))
        inputs = batch(2, 16, seed=5)
        assert rel_err(cap.gm(inputs["input_ids"], inputs["labels"]),
                       model(inputs["input_ids"], inputs["labels"])) <= 1e-13


def test_sliding_window_masks_become_a_window():
    """A causal sliding window (query i sees keys i-3..i) is no longer rejected: it becomes
    ``window=(3, 0)`` on the op (tests/single/test_attention_window.py covers it in depth)."""
    for explicit in (False, True):
        model = masked_gpt(sliding_window_mask, explicit=explicit)
        cap = capture(model, seq_len=32)
        assert canonicalize_attention(cap.gm).info["count"] == NUM_LAYERS
        assert all(n.kwargs["window"] == [3, 0] and n.meta[meta.ATTENTION_WINDOW] == (3, 0)
                   for n in _attentions(cap.gm))
        inputs = batch(2, 16, seed=5)
        assert rel_err(cap.gm(inputs["input_ids"], inputs["labels"]),
                       model(inputs["input_ids"], inputs["labels"])) <= 1e-13


def test_hf_sliding_window_becomes_a_window():
    import transformers

    model, loss_fn = build("hf_qwen2_sdpa", num_layers=1)
    cfg = model.config
    cfg.use_sliding_window, cfg.sliding_window, cfg.layer_types = True, 4, ["sliding_attention"]
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).double()
    cap = capture(model, seq_len=32, loss_fn=loss_fn)
    canonicalize_attention(cap.gm)
    assert [n.kwargs["window"] for n in _attentions(cap.gm)] == [[3, 0]]
    inputs = batch(2, 24, seed=11)
    ref_loss, _ = loss_and_grads(model, loss_fn, dict(model.named_parameters()), inputs)
    assert rel_err(cap.gm(inputs["input_ids"], inputs["labels"]), ref_loss) <= 1e-12


def test_canonical_graph_of_windowless_models_has_no_window_kwarg():
    """Callers that pass only causal/scale keep working: a causal model's op has no window."""
    _, _, program = compiled("hf_llama_sdpa")
    for n in _attentions(program.captured.gm):
        assert "window" not in n.kwargs and n.meta[meta.ATTENTION_WINDOW] is None
