"""The ``flash_attn`` backend of ``helix::attention`` (Dao-AILab flash-attention 2).

Used when ``flash_attn`` imports and the tensors are on CUDA (fp16/bf16, head dim <= 256).
flash-attn takes ``[batch, seq, heads, head_dim]``: we pass transposed *views* of our
``[batch, heads, seq, head_dim]`` tensors (its kernels only need a unit stride on the last
dim) and allocate the gradients in its layout. GQA is native: K/V keep their fewer heads and
dK/dV come back already reduced over the query-head groups.

Its causal mask is bottom-right aligned, SDPA's (and ours) top-left: they agree only when
seq_q == seq_k, so a causal call with different lengths is rejected. The private entry points
``_flash_attn_forward`` / ``_flash_attn_backward`` changed their signature over versions
(``window_size=(l, r)`` until 2.5, ``window_size_left/right`` and ``softcap`` from 2.6, the
forward returning 8 values until 2.5 and 4 after): we bind by parameter name.

Sliding windows: ``helix::attention``'s ``window=(left, right)`` is flash-attn's
``window_size`` (same -1 = unbounded convention); like causal masks, flash-attn aligns
windows bottom-right, so a windowed call needs seq_q == seq_k.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ..errors import HelixError


@functools.cache
def _interface() -> ModuleType | None:
    try:
        return importlib.import_module("flash_attn.flash_attn_interface")
    except Exception:  # ImportError, or a CUDA extension built for another torch: unusable
        return None


def _param_names(fn: Any) -> list[str]:
    # From 2.6 the entry points are torch.library CustomOpDef objects whose __call__ is
    # (*args, **kwargs): read the wrapped function's signature instead.
    for target in (getattr(fn, "_init_fn", None), getattr(fn, "__wrapped__", None), fn):
        if target is None:
            continue
        try:
            params = inspect.signature(target).parameters.values()
        except (TypeError, ValueError):
            continue
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            continue
        return [p.name for p in params]
    raise HelixError(f"cannot read the signature of flash_attn's {fn!r}; "
                     "install flash-attn>=2.6 or set HELIX_ATTENTION_BACKEND=aten")


def _bind(fn: Any, positional: tuple, options: dict[str, Any]) -> Any:
    names = _param_names(fn)
    kwargs = {k: v for k, v in options.items() if k in names[len(positional):]}
    return fn(*positional, **kwargs)


def _window_options(window: tuple[int, int] | None = None) -> dict[str, Any]:
    left, right = window if window is not None else (-1, -1)
    return {"window_size_left": left, "window_size_right": right, "window_size": (left, right),
            "softcap": 0.0, "alibi_slopes": None}


def _pad8(x: Tensor) -> Tensor:
    d = x.shape[-1]
    return x if d % 8 == 0 else torch.nn.functional.pad(x, (0, 8 - d % 8))


def _check_causal(q: Tensor, k: Tensor, causal: bool, window=None) -> None:
    if (causal or window is not None) and q.shape[2] != k.shape[2]:
        what = "causal=True" if window is None else f"window={tuple(window)}"
        raise HelixError(f"flash_attn aligns causal masks and windows bottom-right, "
                         f"helix::attention top-left: seq_q={q.shape[2]} != seq_k={k.shape[2]} "
                         f"is not supported with {what}; use HELIX_ATTENTION_BACKEND=aten")


def _window(window, causal: bool, q: Tensor, k: Tensor) -> tuple[int, int] | None:
    from .attention import normalize_window

    return normalize_window(window, causal, q.shape[2], k.shape[2])


def flash_attn_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                       window: tuple[int, int] | None = None,
                       interface: ModuleType | None = None) -> tuple[Tensor, Tensor]:
    fa = interface or _interface()
    assert fa is not None, "flash_attn backend used without flash_attn"
    window = _window(window, causal, q, k)
    _check_causal(q, k, causal, window)
    d = q.shape[-1]
    qt, kt, vt = (_pad8(x.transpose(1, 2)) for x in (q, k, v))
    res = _bind(fa._flash_attn_forward, (qt, kt, vt),
                {"dropout_p": 0.0, "softmax_scale": scale, "causal": causal,
                 "return_softmax": False, **_window_options(window)})
    # >= 2.6: (out, lse, S_dmask, rng_state); <= 2.5: (out, q, k, v, out_padded, lse, S, rng)
    out, lse = (res[0], res[1]) if len(res) == 4 else (res[4], res[5])
    return out[..., :d].transpose(1, 2), lse


def flash_attn_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        causal: bool, scale: float, window: tuple[int, int] | None = None,
                        interface: ModuleType | None = None) -> tuple[Tensor, Tensor, Tensor]:
    fa = interface or _interface()
    assert fa is not None, "flash_attn backend used without flash_attn"
    window = _window(window, causal, q, k)
    _check_causal(q, k, causal, window)
    d = q.shape[-1]
    dot, qt, kt, vt, ot = (_pad8(x.transpose(1, 2)) for x in (dout, q, k, v, out))
    dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
    _bind(fa._flash_attn_backward, (dot, qt, kt, vt, ot, lse.contiguous(), dq, dk, dv),
          {"dropout_p": 0.0, "softmax_scale": scale, "causal": causal,
           "deterministic": False, "rng_state": None, **_window_options(window)})
    return tuple(x[..., :d].transpose(1, 2) for x in (dq, dk, dv))  # type: ignore[return-value]


def available(device: torch.device) -> bool:
    return device.type == "cuda" and _interface() is not None


def unsupported(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    if dtype not in (torch.float16, torch.bfloat16):
        return f"limited to fp16/bf16, not {dtype}"
    if head_dim > 256:
        return f"limited to head_dim <= 256, not {head_dim}"
    return None
