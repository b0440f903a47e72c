"""Sliding-window attention: recognised as ``helix::attention(..., window=(W - 1, 0))``, run
exactly (loss and every gradient equal the unmodified model in float64), and the features
next to it that the compiler must refuse by name (Gemma2 logit soft-capping, ALiBi)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import sympy  # noqa: E402
import torch  # noqa: E402
from models_for_tests import (  # noqa: E402
    NUM_LAYERS,
    band_mask,
    batch,
    hf_alibi_model,
    hf_loss,
    hf_window_model,
    loss_and_grads,
    masked_gpt,
    max_grad_err,
    rel_err,
)

from helix_compiler import UnsupportedModelError, compile_program  # noqa: E402
from helix_compiler.capture import capture  # noqa: E402
from helix_compiler.ir import meta  # noqa: E402
from helix_compiler.ir.segment import S  # noqa: E402
from helix_compiler.passes import attention as attention_pass  # noqa: E402
from helix_compiler.passes.attention import canonicalize_attention  # noqa: E402
from helix_compiler.passes.segment import run_chain  # noqa: E402

HELIX_ATTENTION = torch.ops.helix.attention.default
SEQ = 64
WINDOW = 16  # tokens: HF keeps kv_idx > q_idx - 16, i.e. helix window (15, 0)


def _attentions(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == HELIX_ATTENTION]


def _windows(gm):
    return [n.meta[meta.ATTENTION_WINDOW] for n in _attentions(gm)]


def _check_chain(program, model, reference, *, tol=1e-12, seed=3):
    """run_chain over the program's segments against ``reference`` (same parameters as
    ``model``, possibly another module sharing them), loss and every gradient."""
    inputs = batch(2, SEQ, seed=seed)
    params = dict(model.named_parameters())
    ref_params = dict(reference.named_parameters())
    ref_loss, ref_grads = loss_and_grads(reference, hf_loss, ref_params, inputs)
    loss = run_chain(program.segments, inputs)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True), strict=True))
    assert rel_err(loss, ref_loss) <= tol, (loss.item(), ref_loss.item())
    err, where = max_grad_err(grads, ref_grads)
    assert err <= tol, f"grad of {where}: relative error {err:.3g}"
    return loss.detach()


def _gemma2_eager_float64(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          softcap=None, **kwargs):
    """transformers' Gemma2 ``eager_attention_forward`` (no soft-capping) with its float32
    softmax in the input dtype."""
    from transformers.models.gemma2.modeling_gemma2 import repeat_kv

    assert softcap is None and dropout == 0.0
    k = repeat_kv(key, module.num_key_value_groups)
    v = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


# (a) Hugging Face models with sliding-window layers ------------------------------------------
EXPECTED_WINDOWS = {
    "mistral": [(WINDOW - 1, 0)] * NUM_LAYERS,
    "qwen2": [None, (WINDOW - 1, 0)],  # layer_types = [full_attention, sliding_attention]
    "gemma2": [(WINDOW - 1, 0), None],  # [sliding_attention, full_attention]
}


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma2"])
def test_hf_sliding_window_compiles_exactly(arch):
    impl = "eager" if arch == "gemma2" else "sdpa"
    model = hf_window_model(arch, attn_implementation=impl)
    program = compile_program(model, pp_size=2, seq_len=SEQ, loss_fn=hf_loss)
    gm = program.captured.gm
    assert _windows(gm) == EXPECTED_WINDOWS[arch]
    for n in _attentions(gm):  # the op's kwargs carry the window too (they survive segmenting)
        w = n.meta[meta.ATTENTION_WINDOW]
        assert n.kwargs["causal"] is True
        assert (tuple(n.kwargs["window"]) if "window" in n.kwargs else None) == w
    seg_windows = [tuple(n.kwargs["window"]) if "window" in n.kwargs else None
                   for seg in program.segments for n in _attentions(seg.gm)]
    assert seg_windows == EXPECTED_WINDOWS[arch]
    # cost model: the fraction of the dense s x s scores a windowed kernel computes
    for seg in program.segments:
        windowed = [n for n in _attentions(seg.gm) if "window" in n.kwargs]
        if windowed:
            frac = sympy.sympify(seg.cost.extra["attention_computed_fraction"])
            assert frac.subs({S: SEQ}) == sympy.Rational(WINDOW * SEQ - (WINDOW - 1) * WINDOW // 2, SEQ * SEQ)
            assert frac.subs({S: 8}) == sympy.Rational(8 * 9 // 2, 64)  # shorter than the window: causal
        else:
            assert "attention_computed_fraction" not in seg.cost.extra
    if arch == "gemma2":
        # Gemma2 has no SDPA path and its eager attention computes the softmax in float32:
        # the float64 reference is the same model with that one softmax in float64; the
        # unmodified eager model agrees to float32 softmax accuracy.
        import transformers.models.gemma2.modeling_gemma2 as gemma2

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gemma2, "eager_attention_forward", _gemma2_eager_float64)
            loss = _check_chain(program, model, model)
        _check_chain(program, model, model, tol=1e-5)
    else:
        loss = _check_chain(program, model, model)
    # The window matters at this length: without it the loss is visibly different.
    full = hf_window_model(arch, attn_implementation=impl, sliding_window=4 * SEQ)
    full.load_state_dict(model.state_dict())
    full_loss, _ = loss_and_grads(full, hf_loss, dict(full.named_parameters()), batch(2, SEQ, seed=3))
    assert rel_err(loss, full_loss) > 1e-6


def test_hf_window_larger_than_sequence_is_plain_causal():
    """sliding_window=16 compiled and run at seq 12: the band reaches back beyond token 0 at
    every row the model runs, but the window is still recorded (it matters at longer runs)."""
    model = hf_window_model("mistral")
    program = compile_program(model, pp_size=2, seq_len=12, loss_fn=hf_loss)
    assert _windows(program.captured.gm) == [(WINDOW - 1, 0)] * NUM_LAYERS
    inputs = batch(2, 12, seed=4)
    params = dict(model.named_parameters())
    ref_loss, _ = loss_and_grads(model, hf_loss, params, inputs)
    assert rel_err(run_chain(program.segments, inputs), ref_loss) <= 1e-12


# (b) hand-built band masks ------------------------------------------------------------------------
def _canonical(model, seq_len=32):
    cap = capture(model, seq_len=seq_len)
    result = canonicalize_attention(cap.gm)
    return cap, result


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("window", [1, 4, 40])
def test_band_masks_are_recognised_with_their_window(explicit, window):
    """SDPA with a bool band mask and masked_fill(~band, -inf) before an explicit softmax.
    window=40 equals causal at every size up to 41 (old probes at 5 and 9 took it for causal):
    the probe just past the constant 40 finds it."""
    model = masked_gpt(band_mask(window), explicit=explicit)
    cap, result = _canonical(model)
    assert result.info["count"] == NUM_LAYERS
    assert _windows(cap.gm) == [(window - 1, 0)] * NUM_LAYERS
    assert all(n.kwargs["window"] == [window - 1, 0] for n in _attentions(cap.gm))
    for seq in (16, SEQ):
        inputs = batch(2, seq, seed=5)
        params = dict(model.named_parameters())
        loss = cap.gm(inputs["input_ids"], inputs["labels"])
        ref = model(inputs["input_ids"], inputs["labels"])
        assert rel_err(loss, ref) <= 1e-13
        grads = torch.autograd.grad(loss, list(params.values()))
        ref_grads = torch.autograd.grad(ref, list(params.values()))
        err, where = max_grad_err(dict(zip(params, grads, strict=True)), dict(zip(params, ref_grads, strict=True)))
        assert err <= 1e-12, (seq, where, err)


@pytest.mark.parametrize("explicit, node", [(False, "scaled_dot_product_attention"), (True, "masked_fill")])
@pytest.mark.parametrize("mask_fn, why", [
    (band_mask(8, hole=(30, 27)), "not a causal band"),  # band + one hole (seen from seq 31)
    (band_mask(8, hole=(3, 3)), "not a causal band"),  # hole on the diagonal
    (band_mask(4, size_dependent=True), "window changes with the sequence length"),
])
def test_masks_that_are_not_a_pure_band_are_rejected(explicit, node, mask_fn, why):
    cap = capture(masked_gpt(mask_fn, explicit=explicit), seq_len=32)
    with pytest.raises(UnsupportedModelError, match="uses a mask helix_compiler cannot pipeline") as info:
        canonicalize_attention(cap.gm)
    msg = str(info.value)
    assert why in msg and f"%{node}" in msg, msg


def test_window_constant_beyond_the_probe_limit_is_rejected_not_assumed_causal(monkeypatch):
    """A window that could only be seen at sizes the probe will not evaluate is not proven."""
    monkeypatch.setattr(attention_pass, "MAX_PROBE_SEQ", 200)
    cap = capture(masked_gpt(band_mask(500)), seq_len=32)
    with pytest.raises(UnsupportedModelError, match=r"constant 500, larger than the mask probe limit"):
        canonicalize_attention(cap.gm)


# (d) soft-capping and ALiBi -------------------------------------------------------------------------
def test_gemma2_logit_softcapping_is_rejected_by_name():
    model = hf_window_model("gemma2", attn_implementation="eager", softcap=50.0)
    with pytest.raises(UnsupportedModelError, match=r"soft-capping.*attn_logit_softcapping=None") as info:
        compile_program(model, pp_size=2, seq_len=32, loss_fn=hf_loss)
    assert "%tanh" in str(info.value)


@pytest.mark.parametrize("arch", ["bloom", "falcon"])
def test_alibi_is_rejected_by_name(arch):
    model = hf_alibi_model(arch)
    with pytest.raises(UnsupportedModelError, match="ALiBi") as info:
        compile_program(model, pp_size=2, seq_len=32, loss_fn=hf_loss)
    assert "call_function" in str(info.value)  # names the node


def test_constant_additive_bias_is_rejected_but_not_as_alibi():
    """A finite additive bias that is not position-linear gets the generic bias error."""
    def bias_fn(input_ids, t):
        keep = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
        return torch.zeros(t, t, dtype=torch.float64).masked_fill(~keep, float("-inf")) + 0.5

    cap = capture(masked_gpt(bias_fn), seq_len=32)
    with pytest.raises(UnsupportedModelError, match="not 0 / -inf") as info:
        canonicalize_attention(cap.gm)
    assert "ALiBi" not in str(info.value)


# the window through the runtime's record/replay of attention (recompute without attention) ---
def test_window_survives_record_and_replay():
    """``kernels.attention_replay`` passes the op's kwargs (window included) to the forward
    and to ``helix::attention_backward``: replayed gradients equal the direct ones."""
    from helix_compiler.kernels import attention_replay

    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 4, 40, 16, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    k2, v2 = k[:, :2].detach().requires_grad_(), v[:, :2].detach().requires_grad_()  # GQA
    dout = torch.randn(1, 4, 40, 16, generator=gen, dtype=torch.float64)
    kw = dict(causal=True, scale=0.25, window=[5, 0])
    out, _ = attention_replay.attention(q, k2, v2, **kw)
    want = torch.autograd.grad(out, (q, k2, v2), dout)
    cache: list = []
    with attention_replay.mode("record", cache):
        attention_replay.attention(q, k2, v2, **kw)
    with attention_replay.mode("replay", cache):
        out_r, _ = attention_replay.attention(q, k2, v2, **kw)
    got = torch.autograd.grad(out_r, (q, k2, v2), dout)
    assert torch.equal(out_r, out.detach())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-14, rtol=0)
    plain, _ = torch.ops.helix.attention(q, k2, v2, causal=True, scale=0.25)
    assert (plain - out).abs().max() > 1e-3  # the window is really applied
