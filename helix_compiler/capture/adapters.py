"""Model adapters: give every supported model the calling convention ``(input_ids, labels) -> loss``."""

from __future__ import annotations

import inspect

import torch

from ..errors import CaptureError


class HFCausalLM(torch.nn.Module):
    """A Hugging Face causal LM called with labels, returning its loss (no KV cache)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        return self.model(input_ids=input_ids, labels=labels, use_cache=False).loss


class WithLossFn(torch.nn.Module):
    """``loss_fn(model(input_ids), labels)``; a Hugging Face output contributes its logits."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, input_ids, labels):
        out = self.model(input_ids)
        if hasattr(out, "logits"):
            out = out.logits
        return self.loss_fn(out, labels)


def is_hf_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "config") and type(model).__module__.startswith("transformers.")


def adapt_model(model: torch.nn.Module, *, loss_fn=None) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"helix_compiler compiles torch.nn.Module instances; got {type(model).__name__}")
    if is_hf_model(model):
        model.config.use_cache = False
        if loss_fn is not None:
            return WithLossFn(model, loss_fn)
        return HFCausalLM(model)
    if loss_fn is not None:
        return WithLossFn(model, loss_fn)
    params = list(inspect.signature(model.forward).parameters)
    if len(params) < 2:
        raise CaptureError(
            f"{type(model).__name__}.forward takes {params}; without loss_fn the model must be called "
            f"as model(input_ids, labels) -> loss. Pass loss_fn=lambda logits, labels: ... otherwise")
    return model
