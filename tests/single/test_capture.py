"""Capture: one ATen GraphModule per model, symbolic in (batch, seq), on real or meta weights."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from models_for_tests import HF_MODELS, batch, build, loss_and_grads, max_grad_err, rel_err  # noqa: E402

from helix_compiler.capture import capture  # noqa: E402
from helix_compiler.ir.segment import B, S  # noqa: E402
from helix_compiler.models import Llama, LlamaConfig  # noqa: E402

aten = torch.ops.aten
ACTIVATION_OPS = (aten.linear.default, aten.layer_norm.default, aten.embedding.default)


@pytest.fixture(scope="module")
def gpt_captured():
    model, _ = build("gpt")
    return model, capture(model, seq_len=32)


@pytest.fixture(scope="module")
def llama_captured():
    model, _ = build("llama")
    return model, capture(model, seq_len=32)


@pytest.mark.parametrize("which", ["gpt_captured", "llama_captured"])
def test_shapes_are_symbolic_in_batch_and_seq(which, request):
    _, cap = request.getfixturevalue(which)
    assert set(cap.symbols.values()) == {B, S}
    placeholders = [n for n in cap.gm.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in placeholders] == cap.input_names == ["input_ids", "labels"]
    for ph in placeholders:
        b, s = ph.meta["val"].shape
        assert isinstance(b, torch.SymInt) and isinstance(s, torch.SymInt)
        assert (cap.to_cost_expr(b), cap.to_cost_expr(s)) == (B, S)
    checked = 0
    for n in cap.gm.graph.nodes:
        if n.op == "call_function" and n.target in ACTIVATION_OPS and n.meta["val"].dim() == 3:
            b, s, _ = n.meta["val"].shape
            assert isinstance(s, torch.SymInt), f"{n.name}: sequence dim was specialised to {s}"
            assert (cap.to_cost_expr(b), cap.to_cost_expr(s)) == (B, S), n.format_node()
            checked += 1
    assert checked >= 4 * 2  # embedding, norms and linears of two layers at least
    attentions = [n for n in cap.gm.graph.nodes
                  if n.op == "call_function" and n.target == aten.scaled_dot_product_attention.default]
    assert len(attentions) == 2
    for n in attentions:
        q = n.args[0].meta["val"]
        assert cap.to_cost_expr(q.shape[2]) == S and cap.to_cost_expr(q.shape[0]) == B


@pytest.mark.parametrize("which", ["gpt_captured", "llama_captured"])
def test_graph_reproduces_model_loss_and_grads(which, request):
    model, cap = request.getfixturevalue(which)
    params = dict(model.named_parameters())
    # the graph's parameters are the user's own objects
    assert {k: id(v) for k, v in cap.gm.named_parameters()} == {k: id(v) for k, v in params.items()}
    for b, s in ((2, 32), (1, 8), (3, 40)):  # other lengths than traced: nothing specialised
        inputs = batch(b, s, seed=b * 100 + s)
        ref_loss, ref_grads = loss_and_grads(model, None, params, inputs)
        loss = cap.gm(inputs["input_ids"], inputs["labels"])
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        assert torch.equal(loss, ref_loss), (b, s, loss.item(), ref_loss.item())
        err, where = max_grad_err(grads, ref_grads)
        assert err == 0.0, f"grad of {where} differs by {err} (b={b}, s={s})"


def test_meta_model_captures_without_allocating():
    with torch.device("meta"):
        model = Llama(LlamaConfig(vocab_size=256, num_layers=2, hidden=64, heads=4, kv_heads=2))
    cap = capture(model, seq_len=131072)
    params = dict(model.named_parameters())
    assert all(p.device.type == "meta" for p in params.values())
    graph_params = dict(cap.gm.named_parameters())
    assert graph_params.keys() == params.keys()
    assert all(graph_params[k] is params[k] for k in params), "capture replaced the user's parameters"
    ids = next(n for n in cap.gm.graph.nodes if n.op == "placeholder")
    assert tuple(cap.to_cost_expr(d) for d in ids.meta["val"].shape) == (B, S)


_RSS_SCRIPT = textwrap.dedent("""
    import resource, torch
    from helix_compiler.capture import capture
    from helix_compiler.models import Llama, LlamaConfig
    with torch.device("meta"):
        m = Llama(LlamaConfig(vocab_size=32000, num_layers=1, hidden=4096, heads=32, kv_heads=8, ffn=11008))
    weights = sum(p.numel() for p in m.parameters()) * 4
    cap = capture(m, seq_len=131072)
    assert all(p.device.type == "meta" for p in cap.gm.parameters())
    print(weights, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


def test_meta_capture_peak_rss_is_far_below_the_weights():
    """A 1-layer Llama-7B-shaped model (1.6 GiB of fp32 weights) at 131072 tokens: the
    capturing process's peak RSS stays under 1.25 GiB (it is ~0.4 GiB: torch itself)."""
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    weights, peak = map(int, out.stdout.split()[-2:])
    assert weights > 1.5 * 2**30
    assert peak < 1.25 * 2**30, f"peak RSS {peak / 2**30:.2f} GiB for a meta model"


@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_models_capture_and_reproduce_their_own_loss(name):
    """Hugging Face causal LMs through the default adapter (their own loss, use_cache off)."""
    model, _ = build(name, num_layers=1)  # one layer keeps export time down; layers are tested elsewhere
    model.config.use_cache = True  # the adapter must turn it off
    cap = capture(model, seq_len=32)
    assert model.config.use_cache is False
    targets = {n.target for n in cap.gm.graph.nodes if n.op == "call_function"}
    if name.endswith("sdpa"):
        assert aten.scaled_dot_product_attention.default in targets
    else:
        assert targets & {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
    assert all(cap.user_fqn(k) in dict(model.named_parameters()) for k, _ in cap.gm.named_parameters())
    inputs = batch(2, 24, seed=7)
    ref = model(input_ids=inputs["input_ids"], labels=inputs["labels"], use_cache=False).loss
    loss = cap.gm(inputs["input_ids"], inputs["labels"])
    # same ops in the same order: bitwise (the HF loss itself is float32: logits.float())
    assert torch.equal(loss, ref), (loss.item(), ref.item(), rel_err(loss, ref))


def test_example_inputs_are_accepted():
    model, _ = build("gpt")
    inputs = batch(2, 12, seed=3)  # batch 1 would be specialised by export (0/1 rule)
    cap = capture(model, seq_len=64, example_inputs=(inputs["input_ids"], inputs["labels"]))
    ids = next(n for n in cap.gm.graph.nodes if n.op == "placeholder")
    assert tuple(cap.to_cost_expr(d) for d in ids.meta["val"].shape) == (B, S)
    assert torch.equal(cap.gm(inputs["input_ids"], inputs["labels"]), model(inputs["input_ids"], inputs["labels"]))
