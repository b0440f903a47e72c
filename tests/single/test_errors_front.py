"""Bad input: a clear error, matching its message, raised before the heavy work it would waste.

"Before heavy work" is checked by replacing the later pipeline steps in
``helix_compiler.program`` with functions that fail the test if they are ever called.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from models_for_tests import COMPILE_STEPS, build, forbid_compile_steps, masked_gpt, padding_mask  # noqa: E402

from helix_compiler import CaptureError, HelixError, UnsupportedModelError, compile_program  # noqa: E402
from helix_compiler.models import GPT, GPTConfig  # noqa: E402

STEPS = COMPILE_STEPS
_forbid = forbid_compile_steps


def _after(step):
    return STEPS[STEPS.index(step) + 1:]


class DataDependentGPT(GPT):
    def forward(self, input_ids, labels):
        if self.wte(input_ids).sum() > 0:  # Python control flow on a tensor value
            labels = labels.flip(0)
        return super().forward(input_ids, labels)


class MLPOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 32)
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(2))
        self.head = nn.Linear(32, 256)

    def forward(self, input_ids, labels):
        x = self.emb(input_ids)
        for layer in self.layers:
            x = x + F.gelu(layer(x))
        return F.cross_entropy(self.head(x).flatten(0, 1), labels.flatten())


def _gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{"num_layers": 2, **kw}))


def test_untraceable_model(monkeypatch):
    _forbid(monkeypatch, *_after("capture"))
    with pytest.raises(CaptureError, match=r"could not capture DataDependentGPT with torch\.export") as info:
        compile_program(DataDependentGPT(GPTConfig(num_layers=2)), pp_size=2, seq_len=32)
    msg = str(info.value)
    assert "data-dependent" in msg
    assert "fix: remove data-dependent Python control flow (an `if` on a tensor value) from forward" in msg


def test_no_attention_found(monkeypatch):
    _forbid(monkeypatch, *_after("tag_layers"))
    with pytest.raises(UnsupportedModelError, match=r"^no attention found in the captured graph"):
        compile_program(MLPOnly(), pp_size=2, seq_len=32)


def test_unsupported_mask(monkeypatch):
    _forbid(monkeypatch, *_after("canonicalize_attention"))
    with pytest.raises(UnsupportedModelError,
                       match=r"attention at %scaled_dot_product_attention : .* uses a mask helix_compiler cannot "
                             r"pipeline \(the mask depends on input data or is not causal\)"):
        compile_program(masked_gpt(padding_mask), pp_size=2, seq_len=32)


@pytest.mark.parametrize("which", ["gpt", "hf_gpt2_sdpa"])
def test_learned_position_table_shorter_than_seq_len(monkeypatch, which):
    if which == "gpt":
        model, loss_fn = _gpt(max_seq_len=64), None
    else:
        model, loss_fn = build("hf_gpt2_sdpa", max_seq_len=64)
    _forbid(monkeypatch, *_after("capture"))
    with pytest.raises(UnsupportedModelError,
                       match=r"seq_len=128 is longer than the model supports: .* limits sequences to 64 tokens; "
                             r"use seq_len <= 64"):
        compile_program(model, pp_size=2, seq_len=128, loss_fn=loss_fn)


def test_position_table_exactly_long_enough_is_accepted():
    program = compile_program(_gpt(max_seq_len=64), pp_size=2, seq_len=64)
    assert program.captured.max_seq_len == 64


def test_pp_size_larger_than_layers(monkeypatch):
    _forbid(monkeypatch, *STEPS)  # the layer ModuleList is counted before tracing
    with pytest.raises(HelixError, match=r"^pp_size=4 is larger than the model's 2 layers; use pp_size <= 2$"):
        compile_program(_gpt(), pp_size=4, seq_len=32, num_microbatches=8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(pp_size=0), r"^pp_size=0 must be a positive integer$"),
    (dict(pp_size=-2), r"^pp_size=-2 must be a positive integer$"),
    (dict(pp_size=2.0), r"^pp_size=2\.0 must be a positive integer$"),
    (dict(pp_size=True), r"^pp_size=True must be a positive integer$"),
    (dict(seq_len=-1), r"^seq_len=-1 must be a positive integer$"),
    (dict(seq_len=2.5), r"^seq_len=2\.5 must be a positive integer$"),
    (dict(seq_len=0), r"^seq_len=0 must be a positive integer$"),
    (dict(seq_len=1), r"^seq_len=1 must be at least 2$"),
    (dict(num_microbatches=0), r"^num_microbatches=0 must be a positive integer$"),
    (dict(num_microbatches=6), r"^num_microbatches=6 must be a multiple of pp_size\*num_folds=4 for the helix "
                               r"schedule; use 4 or 8$"),
    (dict(num_microbatches=4, num_folds=3), r"^num_microbatches=4 must be a multiple of pp_size\*num_folds=6"),
    (dict(num_folds=0), r"^num_folds=0 must be a positive integer$"),
    (dict(micro_batch_size=0), r"^micro_batch_size=0 must be a positive integer$"),
    (dict(micro_batch_size=1.5), r"^micro_batch_size=1\.5 must be a positive integer$"),
])
def test_bad_sizes_are_rejected_before_capture(monkeypatch, kwargs, message):
    _forbid(monkeypatch, *STEPS)
    args = {"pp_size": 2, "seq_len": 32, **kwargs}
    with pytest.raises(HelixError, match=message):
        compile_program(_gpt(), **args)


def test_errors_are_value_errors():
    """HelixError subclasses ValueError, so callers catching ValueError see bad input."""
    for cls in (HelixError, CaptureError, UnsupportedModelError):
        assert issubclass(cls, ValueError)
