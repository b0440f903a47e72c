"""Model adapters: give every supported model the calling convention
``(input_ids, labels, *inputs) -> loss``, where ``inputs`` are the program's extra per-token
inputs by name (``position_ids``, ``attention_mask``, document ids...), passed to the model as
keyword arguments."""

from __future__ import annotations

import inspect

import torch

from ..errors import CaptureError, HelixError, UnsupportedModelError


class HFCausalLM(torch.nn.Module):
    """A Hugging Face causal LM called with labels, returning its loss (no KV cache)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def run(self, input_ids, labels, extra):
        out = self.model(input_ids=input_ids, labels=labels, use_cache=False, **extra)
        loss = getattr(out, "loss", None)
        if loss is None:
            raise CaptureError(
                f"{type(self.model).__name__} returned {describe_output(out)} without a loss: helix_compiler "
                f"trains causal language models; use the model class with a language-model head (e.g. "
                f"LlamaForCausalLM instead of LlamaModel), or pass loss_fn=lambda output, labels: loss")
        return loss


class SelectLoss(torch.nn.Module):
    """``model(input_ids, labels)[loss_output]``: the loss among several outputs (``loss_output``:
    a position in a tuple/list, a key of a dict, or an attribute name of an output object)."""

    def __init__(self, model: torch.nn.Module, loss_output: int | str, *, hf: bool = False):
        super().__init__()
        self.model = model
        self.loss_output = loss_output
        self.hf = hf

    def run(self, input_ids, labels, extra):
        if self.hf:
            out = self.model(input_ids=input_ids, labels=labels, use_cache=False, **extra)
        else:
            out = self.model(input_ids, labels, **extra)
        key = self.loss_output
        if isinstance(key, int):
            if not isinstance(out, (tuple, list)) or not -len(out) <= key < len(out):
                raise CaptureError(f"loss_output={key} selects a position, but the model returned "
                                   f"{describe_output(out)}; pass the position of the loss among its outputs")
            return out[key]
        if isinstance(out, dict):
            if key not in out:
                raise CaptureError(f"loss_output={key!r} is not a key of the model's output "
                                   f"{describe_output(out)}; use one of {list(out)}")
            return out[key]
        if not hasattr(out, key):
            raise CaptureError(f"loss_output={key!r}: the model returned {describe_output(out)}, "
                               f"which has no {key!r}")
        return getattr(out, key)


class WithLossFn(torch.nn.Module):
    """``loss_fn(model(input_ids), labels)``; a Hugging Face output contributes its logits."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def run(self, input_ids, labels, extra):
        out = self.model(input_ids, **extra)
        if hasattr(out, "logits"):
            out = out.logits
        return self.loss_fn(out, labels)


class WithInputs(torch.nn.Module):
    """A model that takes ``(input_ids, labels, **inputs)`` itself, called with ``inputs``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def run(self, input_ids, labels, extra):
        return self.model(input_ids, labels, **extra)


def _with_forward(adapter: torch.nn.Module, names: tuple[str, ...]) -> torch.nn.Module:
    """Give ``adapter`` a ``forward(self, input_ids, labels, <names>)`` (export names the graph's
    placeholders after these parameters) that calls ``adapter.run(input_ids, labels, {...})``."""
    params = ", ".join(names)
    body = ", ".join(f"{n!r}: {n}" for n in names)
    src = (f"def forward(self, input_ids, labels{', ' if names else ''}{params}):\n"
           f"    return self.run(input_ids, labels, {{{body}}})\n")
    scope: dict = {}
    exec(src, scope)  # noqa: S102 - names are validated identifiers (HelixConfig)
    cls = type(f"{type(adapter).__name__}With{''.join(n.title().replace('_', '') for n in names)}",
               (type(adapter),), {"forward": scope["forward"], "__module__": __name__})
    adapter.__class__ = cls
    return adapter


def is_hf_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "config") and type(model).__module__.startswith("transformers.")


def describe_output(out, *, depth: int = 0, dim_name=str) -> str:
    """A short description of what a model returned (shapes of tensors, keys of dicts)."""
    if isinstance(out, torch.Tensor):
        kind = str(out.dtype).replace("torch.", "")
        if out.dim() == 0:
            return f"a 0-dim {kind} tensor"
        return f"a {kind} tensor of shape [{', '.join(dim_name(d) for d in out.shape)}]"
    if depth > 1:
        return type(out).__name__
    if isinstance(out, dict) or hasattr(out, "keys") and callable(out.keys):
        items = ", ".join(f"{k!r}: {describe_output(out[k], depth=depth + 1, dim_name=dim_name)}"
                          for k in list(out.keys())[:6])
        return f"{type(out).__name__} {{{items}}}"
    if isinstance(out, (tuple, list)):
        items = ", ".join(describe_output(v, depth=depth + 1, dim_name=dim_name) for v in out[:6])
        return f"a {type(out).__name__} of {len(out)} values ({items})"
    return f"{type(out).__name__} {out!r}"[:120]


def check_model_early(model, *, loss_fn=None, loss_output=None) -> None:
    """What can be said about ``model`` before any tracing: it is an nn.Module, not an
    encoder-decoder, and ``loss_fn`` / ``loss_output`` are well-formed."""
    if model is None:
        raise HelixError("model=None: pass the torch.nn.Module to compile (e.g. compile_program(model, "
                         "pp_size=..., seq_len=...))")
    if not isinstance(model, torch.nn.Module):
        what = getattr(model, "__name__", None) or type(model).__name__
        raise HelixError(f"model is a {type(model).__name__} ({what}), not a torch.nn.Module; helix_compiler "
                         f"compiles nn.Module instances: wrap it in an nn.Module whose forward(input_ids, labels) "
                         f"returns the loss")
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "is_encoder_decoder", False) is True:
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder model (config.is_encoder_decoder=True): "
            f"encoder-decoder models are not supported; helix_compiler pipelines decoder-only causal "
            f"language models (one token sequence, causal attention): use a decoder-only causal LM such as "
            f"LlamaForCausalLM, Qwen2ForCausalLM or GPT2LMHeadModel")
    if loss_fn is not None and not callable(loss_fn):
        raise HelixError(f"loss_fn={loss_fn!r} is not callable; pass loss_fn=lambda logits, labels: loss, or "
                         f"None for a model whose forward(input_ids, labels) returns the loss")
    if loss_output is not None:
        if isinstance(loss_output, bool) or not isinstance(loss_output, (int, str)):
            raise HelixError(f"loss_output={loss_output!r} must be a position (int) or a key/attribute name "
                             f"(str) of the model's outputs, or None when the model returns the loss alone")
        if loss_fn is not None:
            raise HelixError(f"loss_output={loss_output!r} and loss_fn are exclusive: loss_output picks the loss "
                             f"among the model's outputs, loss_fn computes it from the logits; pass one")


def adapt_model(model: torch.nn.Module, *, loss_fn=None, loss_output=None,
                inputs: tuple[str, ...] = ()) -> torch.nn.Module:
    check_model_early(model, loss_fn=loss_fn, loss_output=loss_output)
    inputs = tuple(inputs)
    if is_hf_model(model):
        model.config.use_cache = False
        if loss_fn is not None:
            adapter = WithLossFn(model, loss_fn)
        elif loss_output is not None:
            adapter = SelectLoss(model, loss_output, hf=True)
        else:
            adapter = HFCausalLM(model)
        return _with_forward(adapter, inputs)
    if loss_fn is not None:
        return _with_forward(WithLossFn(model, loss_fn), inputs)
    if loss_output is not None:
        return _with_forward(SelectLoss(model, loss_output), inputs)
    sig = inspect.signature(model.forward).parameters
    params = list(sig)
    if len(params) < 2:
        raise CaptureError(
            f"{type(model).__name__}.forward takes {params}; without loss_fn the model must be called "
            f"as model(input_ids, labels) -> loss. Pass loss_fn=lambda logits, labels: ... otherwise")
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values())
    missing = [n for n in inputs if n not in sig and not takes_kwargs]
    if missing:
        raise HelixError(f"inputs={inputs!r}: {type(model).__name__}.forward{inspect.signature(model.forward)} "
                         f"takes no {missing[0]!r}; add that keyword parameter or drop it from inputs")
    return _with_forward(WithInputs(model), inputs) if inputs else model
