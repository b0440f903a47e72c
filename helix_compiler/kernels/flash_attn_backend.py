"""The ``flash_attn`` backend of ``helix::attention`` (Dao-AILab flash-attention 2).

Used when ``flash_attn`` imports and the tensors are on CUDA (fp16/bf16, head dim <= 256).
flash-attn takes ``[batch, seq, heads, head_dim]``: we pass transposed *views* of our
``[batch, heads, seq, head_dim]`` tensors (its kernels only need a unit stride on the last
dim) and allocate the gradients in its layout. GQA is native: K/V keep their fewer heads and
dK/dV come back already reduced over the query-head groups.

Its causal mask is bottom-right aligned, SDPA's (and ours) top-left: they agree only when
seq_q == seq_k, so a causal call with different lengths is rejected. The private entry points
``_flash_attn_forward`` / ``_flash_attn_backward`` changed their signature over versions
(``window_size=(l, r)`` from 2.3 until 2.6, ``window_size_left/right`` from 2.7, ``softcap``
from 2.6, the forward returning 8 values until 2.6 and 4 from 2.7): we bind by parameter name.

Sliding windows: ``helix::attention``'s ``window=(left, right)`` is flash-attn's
``window_size`` (same -1 = unbounded convention); like causal masks, flash-attn aligns
windows bottom-right, so a windowed call needs seq_q == seq_k.

Documents (``doc_ids=``, ``[batch, seq]``): the varlen entry points
``_flash_attn_varlen_forward`` / ``_flash_attn_varlen_backward``. The ``batch x seq`` tokens
are flattened to ``[total, heads, head_dim]`` and every document is one varlen sequence
(``cu_seqlens`` of the document starts, ``max_seqlen`` the longest document, from
``documents.document_bounds``; the same for queries and keys). Inside a document seq_q ==
seq_k, so flash-attn's bottom-right causal mask and window are ours. The varlen lse layout
changed in 2.6 (``flash_api.cpp``, ``mha_varlen_fwd``/``mha_varlen_bwd``): ``[heads, total]``
("unpadded lse") from 2.6, ``[num_docs, heads, max_seqlen]`` (one padded row per document)
before. The forward's result is converted to ``[batch, heads, seq]`` by its shape; the
backward gives flash-attn the layout of its version, told by its signature (``softcap``, a
parameter of ``_flash_attn_varlen_backward`` since the same 2.6). When every document is one
token long flash-attn would take its "seqlen_q == 1, GQA" path (which reshapes q and lse for
decoding); a ``(0, 0)`` window, which masks nothing then, keeps it off.
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
from .documents import check_doc_ids, document_bounds, token_documents


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
                       interface: ModuleType | None = None, *,
                       doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    fa = interface or _interface()
    assert fa is not None, "flash_attn backend used without flash_attn"
    if doc_ids is not None:
        return _varlen_forward(fa, q, k, v, causal, scale, window, doc_ids)
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
                        interface: ModuleType | None = None, *,
                        doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    fa = interface or _interface()
    assert fa is not None, "flash_attn backend used without flash_attn"
    if doc_ids is not None:
        return _varlen_backward(fa, dout, q, k, v, out, lse, causal, scale, window, doc_ids)
    window = _window(window, causal, q, k)
    _check_causal(q, k, causal, window)
    d = q.shape[-1]
    dot, qt, kt, vt, ot = (_pad8(x.transpose(1, 2)) for x in (dout, q, k, v, out))
    dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
    _bind(fa._flash_attn_backward, (dot, qt, kt, vt, ot, lse.contiguous(), dq, dk, dv),
          {"dropout_p": 0.0, "softmax_scale": scale, "causal": causal,
           "deterministic": False, "rng_state": None, **_window_options(window)})
    return tuple(x[..., :d].transpose(1, 2) for x in (dq, dk, dv))  # type: ignore[return-value]


# --- documents: the varlen entry points ---------------------------------------------------------
def _flat(x: Tensor) -> Tensor:
    """``[b, h, s, d]`` -> flash-attn's varlen ``[b * s, h, d]`` (head dim padded to 8)."""
    b, h, s, d = x.shape
    return _pad8(x.transpose(1, 2).reshape(b * s, h, d))


def _unflat(x: Tensor, b: int, s: int, d: int) -> Tensor:
    """Varlen ``[b * s, h, d_padded]`` -> ``[b, h, s, d]`` (a view)."""
    return x.view(b, s, x.shape[1], x.shape[2])[..., :d].transpose(1, 2)


def varlen_lse_to_helix(lse: Tensor, doc_ids: Tensor) -> Tensor:
    """flash-attn's varlen lse -> helix's ``[batch, heads, seq]`` (contiguous), by its shape:
    ``[heads, total]`` (>= 2.6) or ``[num_docs, heads, max_seqlen]`` (< 2.6, each document's
    rows from position 0, the tail of the shorter ones unused)."""
    b, s = doc_ids.shape
    if lse.dim() == 2:
        h = lse.shape[0]
        assert lse.shape[1] == b * s, (tuple(lse.shape), b, s)
        return lse.reshape(h, b, s).transpose(0, 1).contiguous()
    assert lse.dim() == 3, tuple(lse.shape)
    doc, offset = token_documents(doc_ids)
    return lse[doc, :, offset].reshape(b, s, lse.shape[1]).transpose(1, 2).contiguous()


def helix_lse_to_varlen(lse: Tensor, doc_ids: Tensor, num_docs: int, max_seqlen: int,
                        unpadded: bool) -> Tensor:
    """helix's ``[batch, heads, seq]`` lse -> the varlen layout flash-attn's backward reads:
    ``[heads, total]`` when ``unpadded`` (>= 2.6), else ``[num_docs, heads, max_seqlen]``."""
    b, h, s = lse.shape
    lse = lse.to(torch.float32)
    if unpadded:
        return lse.transpose(0, 1).reshape(h, b * s).contiguous()
    doc, offset = token_documents(doc_ids)
    padded = lse.new_zeros((num_docs, h, max_seqlen))  # the padding rows are never read
    padded[doc, :, offset] = lse.transpose(1, 2).reshape(b * s, h)
    return padded


def _unpadded_lse(fa: Any) -> bool:
    """Does this flash-attn keep the varlen lse as ``[heads, total]`` (>= 2.6)? 2.6 added
    ``softcap`` to ``_flash_attn_varlen_backward`` in the release that changed the layout."""
    return "softcap" in _param_names(fa._flash_attn_varlen_backward)


def _has_windows(fn: Any) -> bool:
    names = _param_names(fn)
    return "window_size" in names or "window_size_left" in names


def _check_window_supported(fn: Any, window: tuple[int, int] | None) -> None:
    if window is not None and not _has_windows(fn):
        raise HelixError(f"this flash_attn has no sliding windows (window={tuple(window)}); "
                         "install flash-attn>=2.6 or set HELIX_ATTENTION_BACKEND=aten")


def _varlen_setup(fa_fn: Any, q: Tensor, k: Tensor, causal: bool, window, doc_ids: Tensor):
    check_doc_ids(doc_ids, q.shape[0], q.shape[2], k.shape[2])
    doc_ids = doc_ids.to(q.device)
    window = _window(window, causal, q, k)
    cu_seqlens, max_seqlen = document_bounds(doc_ids)
    _check_window_supported(fa_fn, window)
    if max_seqlen == 1 and _has_windows(fa_fn):
        window = (0, 0)  # one-token documents: see the module docstring
    return doc_ids, window, cu_seqlens, max_seqlen


def _varlen_forward(fa: Any, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, window,
                    doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    fn = fa._flash_attn_varlen_forward
    doc_ids, window, cu, max_seqlen = _varlen_setup(fn, q, k, causal, window, doc_ids)
    b, _, s, d = q.shape
    res = _bind(fn, (_flat(q), _flat(k), _flat(v), cu, cu, max_seqlen, max_seqlen),
                {"dropout_p": 0.0, "softmax_scale": scale, "causal": causal,
                 "return_softmax": False, "block_table": None, **_window_options(window)})
    # >= 2.7: (out, lse, S_dmask, rng_state); <= 2.6: (out, q, k, v, out_padded, lse, S, rng),
    # 2.0: the same without rng
    out, lse = (res[0], res[1]) if len(res) == 4 else (res[4], res[5])
    return _unflat(out, b, s, d), varlen_lse_to_helix(lse, doc_ids)


def _varlen_backward(fa: Any, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                     lse: Tensor, causal: bool, scale: float, window,
                     doc_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    fn = fa._flash_attn_varlen_backward
    doc_ids, window, cu, max_seqlen = _varlen_setup(fn, q, k, causal, window, doc_ids)
    b, _, s, d = q.shape
    dot, qt, kt, vt, ot = (_flat(x) for x in (dout, q, k, v, out))
    dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
    lse_fa = helix_lse_to_varlen(lse, doc_ids, cu.numel() - 1, max_seqlen, _unpadded_lse(fa))
    _bind(fn, (dot, qt, kt, vt, ot, lse_fa, dq, dk, dv, cu, cu, max_seqlen, max_seqlen),
          {"dropout_p": 0.0, "softmax_scale": scale, "causal": causal,
           "deterministic": False, "rng_state": None, **_window_options(window)})
    return tuple(_unflat(x, b, s, d) for x in (dq, dk, dv))  # type: ignore[return-value]


def available(device: torch.device) -> bool:
    return device.type == "cuda" and _interface() is not None


def unsupported(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    if dtype not in (torch.float16, torch.bfloat16):
        return f"limited to fp16/bf16, not {dtype}"
    if head_dim > 256:
        return f"limited to head_dim <= 256, not {head_dim}"
    return None
