"""Trust, compile-time half: never a silently different model; every bad input a clear error.

Each rejection is checked for its message (it names the value seen and the fix) and for
where it happens: before tracing (the later steps of ``compile_program`` are replaced by
functions that fail the test), or right after capture for what only the graph can tell.
Each accepted case is checked against the user's model: float64 loss and every parameter
gradient of the compiled segment chain.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from models_for_tests import (  # noqa: E402
    COMPILE_STEPS,
    HEADS,
    HIDDEN,
    VOCAB,
    batch,
    forbid_compile_steps,
    loss_and_grads,
    max_grad_err,
    rel_err,
)

from helix_compiler import CaptureError, HelixError, UnsupportedModelError, compile_program  # noqa: E402
from helix_compiler.config import HelixConfig  # noqa: E402
from helix_compiler.models import GPT, GPTConfig  # noqa: E402
from helix_compiler.passes.segment import run_chain  # noqa: E402

STEPS = COMPILE_STEPS
_forbid = forbid_compile_steps


def _gpt(cls=GPT, **kw):
    torch.manual_seed(0)
    return cls(GPTConfig(**{"num_layers": 2, "hidden": HIDDEN, "heads": HEADS, "vocab_size": VOCAB,
                            "max_seq_len": 256, **kw})).double()


def _trunk(model, input_ids):
    t = input_ids.shape[1]
    x = model.wte(input_ids) + model.wpe(torch.arange(t, device=input_ids.device))
    for block in model.h:
        x = block(x)
    return F.linear(model.ln_f(x), model.wte.weight)


class LogitsDictGPT(GPT):
    """forward(input_ids, labels) -> {"logits": ...}: no loss at all."""

    def forward(self, input_ids, labels):
        return {"logits": _trunk(self, input_ids)}


class LossAndLogitsGPT(GPT):
    """forward(input_ids, labels) -> (loss, logits)."""

    def forward(self, input_ids, labels):
        logits = _trunk(self, input_ids)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten()), logits


class LossDictGPT(GPT):
    """forward(input_ids, labels) -> {"logits": ..., "loss": ...}."""

    def forward(self, input_ids, labels):
        logits = _trunk(self, input_ids)
        return {"logits": logits, "loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten())}


class LogitsGPT(GPT):
    """forward(input_ids) -> logits, for loss_fn."""

    def forward(self, input_ids):
        return _trunk(self, input_ids)


def shifted_loss(logits, labels):
    """The next-token loss written on shifted logits (labels are the input ids)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def _matches_model(model, program, *, loss_fn=None, loss_output=None, tol=1e-12):
    from helix_compiler.capture.adapters import adapt_model

    inputs = batch(2, 32, seed=3)
    params = dict(model.named_parameters())
    module = adapt_model(model, loss_fn=loss_fn, loss_output=loss_output)
    ref_loss, ref_grads = loss_and_grads(module, None, params, inputs)
    loss = run_chain(program.segments, inputs)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True), strict=True))
    assert rel_err(loss, ref_loss) <= tol, (loss.item(), ref_loss.item())
    err, where = max_grad_err(grads, ref_grads)
    assert err <= tol, f"grad of {where}: relative error {err:.3g}"


# --- 2. the captured output must be the loss --------------------------------------------------------
@pytest.mark.parametrize("case, message", [
    ("dict", r"^LogitsDictGPT\.forward returned dict \{'logits': a float64 tensor of shape \[batch, seq, 256\]\}, "
             r"not a scalar loss: .* fix: return the loss from forward\(input_ids, labels\), or pass loss_fn="),
    ("tuple", r"^LossAndLogitsGPT\.forward returned a tuple of 2 values \(a 0-dim float64 tensor, a float64 tensor "
              r"of shape \[batch, seq, 256\]\), not a scalar loss: .* fix: pass loss_output=0 \(the loss among the "
              r"outputs\)"),
    ("loss_fn", r"^loss_fn returned a float64 tensor of shape \[batch, seq, 256\], not a scalar loss: .* fix: "
                r"loss_fn\(logits, labels\) must return the scalar loss"),
])
def test_output_that_is_not_a_scalar_loss_is_rejected(monkeypatch, case, message):
    _forbid(monkeypatch, *STEPS[1:])  # found right after capture, before any pass
    if case == "dict":
        model, kw = _gpt(LogitsDictGPT), {}
    elif case == "tuple":
        model, kw = _gpt(LossAndLogitsGPT), {}
    else:
        model, kw = _gpt(LogitsGPT), {"loss_fn": lambda logits, labels: logits * 2}
    with pytest.raises(CaptureError, match=message):
        compile_program(model, pp_size=2, seq_len=32, **kw)


@pytest.mark.parametrize("cls, loss_output", [(LossAndLogitsGPT, 0), (LossAndLogitsGPT, -2), (LossDictGPT, "loss")])
def test_loss_output_selects_the_loss_exactly(cls, loss_output):
    model = _gpt(cls)
    program = compile_program(model, pp_size=2, seq_len=32, loss_output=loss_output)
    assert program.config.loss_output == loss_output
    _matches_model(model, program, loss_output=loss_output)


@pytest.mark.parametrize("loss_output, message", [
    (True, r"^loss_output=True must be a position \(int\) or a key/attribute name \(str\)"),
    (1.5, r"^loss_output=1\.5 must be a position \(int\) or a key/attribute name \(str\)"),
])
def test_bad_loss_output_is_rejected_before_capture(monkeypatch, loss_output, message):
    _forbid(monkeypatch, *STEPS)
    with pytest.raises(HelixError, match=message):
        compile_program(_gpt(LossAndLogitsGPT), pp_size=2, seq_len=32, loss_output=loss_output)


def test_loss_output_and_loss_fn_are_exclusive(monkeypatch):
    _forbid(monkeypatch, *STEPS)
    with pytest.raises(HelixError, match=r"^loss_output=0 and loss_fn are exclusive"):
        compile_program(_gpt(LogitsGPT), pp_size=2, seq_len=32, loss_output=0, loss_fn=shifted_loss)


def test_loss_output_key_missing_names_the_keys():
    with pytest.raises(CaptureError, match=r"loss_output='lss' is not a key of the model's output .*; use one of "
                                           r"\['logits', 'loss'\]"):
        compile_program(_gpt(LossDictGPT), pp_size=2, seq_len=32, loss_output="lss")


def test_hf_model_without_lm_head_is_rejected():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=172, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=2, use_cache=False)
    with pytest.raises(CaptureError, match=r"LlamaModel returned BaseModelOutputWithPast .* without a loss: .* use "
                                           r"the model class with a language-model head \(e\.g\. LlamaForCausalLM"):
        compile_program(transformers.LlamaModel(cfg).double(), pp_size=2, seq_len=32)


# --- 3. bad models and inputs, named before tracing -------------------------------------------------
@pytest.mark.parametrize("model, message", [
    (None, r"^model=None: pass the torch\.nn\.Module to compile"),
    (lambda input_ids, labels: input_ids, r"^model is a function \(<lambda>\), not a torch\.nn\.Module; .* wrap it "
                                          r"in an nn\.Module"),
    ("gpt2", r"^model is a str \(str\), not a torch\.nn\.Module"),
])
def test_model_that_is_not_a_module(monkeypatch, model, message):
    _forbid(monkeypatch, *STEPS)
    with pytest.raises(HelixError, match=message):
        compile_program(model, pp_size=2, seq_len=32)


def test_encoder_decoder_is_rejected_before_tracing(monkeypatch):
    import transformers

    torch.manual_seed(0)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=128, num_layers=2, num_heads=HEADS, use_cache=False))
    _forbid(monkeypatch, *STEPS)
    with pytest.raises(UnsupportedModelError,
                       match=r"^T5ForConditionalGeneration is an encoder-decoder model \(config\.is_encoder_decoder"
                             r"=True\): encoder-decoder models are not supported; .* use a decoder-only causal LM"):
        compile_program(t5, pp_size=2, seq_len=32)


def test_shifted_logits_loss_fn_is_exact():
    """``logits[:, :-1]`` makes export demand seq >= 3 (size 1 is special to it); capture
    retries with that bound, and the compiled chain equals the model."""
    model = _gpt(LogitsGPT)
    program = compile_program(model, pp_size=2, seq_len=32, loss_fn=shifted_loss)
    assert program.captured.min_seq_len == 3
    _matches_model(model, program, loss_fn=shifted_loss)
    chunked = compile_program(model, pp_size=2, seq_len=32, loss_fn=shifted_loss, mlp_chunks=4)
    _matches_model(model, chunked, loss_fn=shifted_loss, tol=1e-12)


def test_shifted_logits_loss_fn_rejects_too_short_sequences():
    with pytest.raises(UnsupportedModelError, match=r"^seq_len=2 is shorter than the model supports: it needs at "
                                                    r"least 3 tokens .*; use seq_len >= 3"):
        compile_program(_gpt(LogitsGPT), pp_size=2, seq_len=2, loss_fn=shifted_loss)


@pytest.mark.parametrize("example, message", [
    ("labels_none", r"^example_inputs: labels is None; .* pass example_inputs=\(input_ids, labels\)"),
    ("ids_only", r"^example_inputs must be \(input_ids, labels\); got 1 values"),
    ("float_ids", r"^example_inputs: input_ids is a torch\.float64 tensor of shape \(2, 32\); expected integer "
                  r"token ids of shape \[batch, seq\]"),
    ("shape", r"^example_inputs: labels shape \(2, 31\) differs from input_ids shape \(2, 32\)"),
])
def test_bad_example_inputs_are_rejected_before_capture(monkeypatch, example, message):
    inputs = batch(2, 32)
    ids, labels = inputs["input_ids"], inputs["labels"]
    given = {"labels_none": (ids, None), "ids_only": (ids,), "float_ids": (ids.double(), labels),
             "shape": (ids, labels[:, :31])}[example]
    _forbid(monkeypatch, *STEPS)
    with pytest.raises(HelixError, match=message):
        compile_program(_gpt(), pp_size=2, seq_len=32, example_inputs=given)


def test_mlp_chunks_larger_than_seq_len_is_rejected_before_capture(monkeypatch):
    _forbid(monkeypatch, *STEPS)
    with pytest.raises(HelixError, match=r"^mlp_chunks=64 is larger than seq_len=32: each MLP chunk needs at least "
                                         r"one token; use 1 <= mlp_chunks <= 32"):
        compile_program(_gpt(), pp_size=2, seq_len=32, mlp_chunks=64)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_microbatches=10), r"^num_microbatches=10 must be a multiple of pp_size\*num_folds=4 for the helix "
                                r"schedule; use 8 or 12$"),
    (dict(schedule="helix", virtual_stages=2), r"^virtual_stages=2 applies to schedule='interleaved' only \(got "
                                               r"schedule='helix'\); leave it None$"),
    (dict(schedule="interleaved", virtual_stages=1, num_microbatches=4),
     r"^virtual_stages=1 must be an int >= 2"),
    (dict(schedule="1f1b", num_microbatches=1), r"^num_microbatches=1 must be >= pp_size=2 for schedule='1f1b'.*; "
                                                r"use num_microbatches >= 2, or schedule='gpipe'$"),
    (dict(schedule="zb1p", num_microbatches=1), r"^num_microbatches=1 must be >= pp_size=2 for schedule='zb1p'"),
    (dict(schedule="interleaved", num_microbatches=3), r"^num_microbatches=3 must be a multiple of pp_size=2 for "
                                                       r"schedule='interleaved' .*; use 2 or 4$"),
    (dict(loss_fn=42), r"^loss_fn=42 is not callable"),
])
def test_config_values_that_failed_later_are_rejected_before_capture(monkeypatch, kwargs, message):
    _forbid(monkeypatch, *STEPS)
    with pytest.raises(HelixError, match=message):
        compile_program(_gpt(), pp_size=2, seq_len=32, **kwargs)


def test_helix_config_checks_alone():
    """HelixConfig (what helix_compile builds too) carries the same checks."""
    with pytest.raises(HelixError, match=r"^mlp_chunks=9 is larger than seq_len=8"):
        HelixConfig(pp_size=2, seq_len=8, mlp_chunks=9)
    with pytest.raises(HelixError, match=r"^loss_output=\[0\] must be a position"):
        HelixConfig(pp_size=2, seq_len=8, loss_output=[0])
    assert HelixConfig(pp_size=2, seq_len=8, mlp_chunks=8, loss_output="loss").loss_output == "loss"
