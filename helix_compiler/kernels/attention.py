"""``helix::attention(q, k, v, doc_ids=None, *, causal, scale, window=None) -> (out, lse)``:
the one attention op of a canonical graph.

``doc_ids`` (``[batch, seq]`` integers, per row nondecreasing from 0, one contiguous run per
document; ``helix::document_ids`` makes them from the user's ``position_ids``, document ids
or padding mask) masks attention at document boundaries: query i sees key j only if both lie
in one document (on top of causal and window, whose arithmetic uses the global positions).
Backends that declare ``documents=True`` take ``doc_ids=`` natively (Triton, flash-attn's
varlen kernels); for the others the op runs the backend once per document on its slice of
the sequence (the block-diagonal path: no s x s mask is ever built).

``window`` is flash-attn's ``window_size``: ``(left, right)``, ``-1`` = unbounded. Query ``i``
sees key ``j`` iff ``i - left <= j <= i + right`` (and ``j <= i`` when causal; masks are
top-left aligned as SDPA's). A causal sliding window of ``W`` tokens as Hugging Face builds it
(``kv_idx > q_idx - W``) is ``causal=True, window=(W - 1, 0)``. ``None`` (the default, what
callers that pass only causal/scale get) or ``(-1, -1)`` means no window.

Layout ``[batch, heads, seq, head_dim]``; K/V may have fewer heads than Q (GQA: every
``hq // hkv`` query heads share one K/V head). ``lse`` is the log-sum-exp of the scaled
scores per query row, ``[batch, heads, seq]``, float32 for half inputs. Its backward,
``helix::attention_backward``, consumes the saved ``out`` and ``lse`` and never reruns the
forward: that is what HelixPipe's "recompute everything but attention" relies on.

Backends are looked up in ``BACKENDS`` by name; ``HELIX_ATTENTION_BACKEND`` (or
``set_attention_backend``) forces one, else the first available one for the device (and,
where a backend declares ``unsupported``, for the dtype and head dim) wins. Preference order:
``flash_attn`` (CUDA, when the package imports), ``aten`` (CPU: the flash-attention-for-CPU
ops; CUDA: torch's flash op for fp16/bf16, the memory-efficient op otherwise), ``triton``
(CUDA, or CPU tensors when ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..errors import HelixError
from .documents import check_doc_ids, document_runs

ENV_VAR = "HELIX_ATTENTION_BACKEND"


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    # (q, k, v, causal, scale[, window]) -> (out, lse); window (left, right) is passed only
    # when the call has one, so a backend written before windows existed keeps working.
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]  # (dout, q, k, v, out, lse, causal, scale[, window])
    available: Callable[[torch.device], bool]  # usable on this device?
    # Optional finer check: None if (device, dtype, head_dim) is supported, else the reason.
    unsupported: Callable[[torch.device, torch.dtype, int], str | None] | None = None
    # True: forward/backward take ``doc_ids=`` (passed only when the call has documents);
    # False: the op runs them once per document instead.
    documents: bool = False

    def reason_unusable(self, device: torch.device, dtype: torch.dtype | None = None,
                        head_dim: int | None = None) -> str | None:
        """Why this backend cannot run these inputs (``None`` when it can)."""
        if not self.available(device):
            return f"not available on {device}"
        if self.unsupported is not None and dtype is not None and head_dim is not None:
            return self.unsupported(device, dtype, head_dim)
        return None


BACKENDS: dict[str, AttentionBackend] = {}  # in order of preference
_forced: str | None = None


def register_backend(backend: AttentionBackend, *, first: bool = False) -> None:
    global BACKENDS
    if first:
        BACKENDS = {backend.name: backend, **{k: v for k, v in BACKENDS.items() if k != backend.name}}
    else:
        BACKENDS[backend.name] = backend


def set_attention_backend(name: str | None) -> None:
    """Force a backend for this process (``None`` restores automatic choice)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise HelixError(f"unknown attention backend {name!r}; known: {sorted(BACKENDS)}")
    _forced = name


def select_backend(device: torch.device, dtype: torch.dtype | None = None,
                   head_dim: int | None = None) -> AttentionBackend:
    """The backend that runs attention on ``device`` (and ``dtype``/``head_dim`` if given).

    A forced backend (``set_attention_backend`` or ``HELIX_ATTENTION_BACKEND``) is used or
    rejected with a ``HelixError``; it never silently falls back to another one.
    """
    name = _forced or os.environ.get(ENV_VAR) or None
    if name is not None:
        if name not in BACKENDS:
            raise HelixError(f"{ENV_VAR}={name!r} is not a known attention backend; "
                             f"use one of {sorted(BACKENDS)}")
        backend = BACKENDS[name]
        reason = backend.reason_unusable(device, dtype, head_dim)
        if reason is not None:
            usable = [b for b, v in BACKENDS.items()
                      if v.reason_unusable(device, dtype, head_dim) is None]
            raise HelixError(f"attention backend {name!r} was forced but is {reason} "
                             f"(device={device}, dtype={dtype}, head_dim={head_dim}); unset "
                             f"{ENV_VAR} / call set_attention_backend(None), or pick one of "
                             f"{usable}")
        return backend
    for backend in BACKENDS.values():
        if backend.reason_unusable(device, dtype, head_dim) is None:
            return backend
    raise HelixError(f"no attention backend is available on {device} for dtype={dtype}, "
                     f"head_dim={head_dim}; known backends: "
                     f"{ {b: v.reason_unusable(device, dtype, head_dim) for b, v in BACKENDS.items()} }")


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _reduce_kv(dx: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return dx
    b, h, s, d = dx.shape
    return dx.view(b, h // groups, groups, s, d).sum(2)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


Window = tuple[int, int]


def normalize_window(window, causal: bool, seq_q: int, seq_k: int) -> Window | None:
    """``(left, right)`` with every side that masks nothing at these sizes set to -1 (causal
    already bounds the right side by 0); ``None`` when the window masks nothing at all, so the
    caller takes its plain causal / full path."""
    if window is None:
        return None
    if len(window) != 2 or any(int(w) < -1 for w in window):
        raise HelixError(f"helix::attention window={tuple(window)!r}: expected (left, right) with "
                         f"each side >= 0 or -1 (unbounded), e.g. (4095, 0) for a causal window "
                         f"of 4096 tokens")
    left, right = (int(w) for w in window)
    if left >= seq_q - 1:  # i - left <= 0 <= j for every query row i
        left = -1
    if causal and right >= 0:
        right = -1  # causal already keeps j <= i, a tighter bound than any right >= 0
    if right >= seq_k - 1:
        right = -1
    return None if (left, right) == (-1, -1) else (left, right)


def window_keep(seq_q: int, seq_k: int, causal: bool, window: Window | None,
                device: torch.device | None = None) -> Tensor:
    """Bool ``[seq_q, seq_k]`` keep-mask (True = attend) of ``causal`` + ``window``."""
    return _block_keep(0, seq_q, 0, seq_k, causal, window, device)


def _block_keep(i0: int, i1: int, lo: int, hi: int, causal: bool, window: Window | None,
                device: torch.device | None) -> Tensor:
    """Keep-mask of query rows ``[i0, i1)`` against keys ``[lo, hi)``."""
    rows = torch.arange(i0, i1, device=device)[:, None]
    cols = torch.arange(lo, hi, device=device)[None, :]
    keep = torch.ones(i1 - i0, hi - lo, dtype=torch.bool, device=device)
    if causal:
        keep &= cols <= rows
    if window is not None:
        left, right = window
        if left >= 0:
            keep &= cols >= rows - left
        if right >= 0:
            keep &= cols <= rows + right
    return keep


def _key_range(i0: int, i1: int, seq_k: int, causal: bool, window: Window | None) -> tuple[int, int]:
    """Keys that rows ``[i0, i1)`` may see: ``[lo, hi)``."""
    lo, hi = 0, seq_k
    left, right = window if window is not None else (-1, -1)
    if left >= 0:
        lo = max(0, i0 - left)
    if causal:
        hi = min(hi, i1)
    if right >= 0:
        hi = min(hi, i1 + right)
    return lo, max(lo, hi)


BLOCK_Q = 128  # query rows per block of the blockwise path


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def blockwise_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                      window: Window | None, block_q: int = BLOCK_Q) -> tuple[Tensor, Tensor]:
    """Exact attention one block of query rows at a time, computing only the keys the block
    can see: at most ``block_q x (block_q + left)`` scores per (batch, head) exist at once.
    Any device; half inputs are computed in float32 (lse float32, out cast back). Rows that
    see no key get out 0 and lse -inf. GQA by expanding K/V."""
    b, h, sq, d = q.shape
    sk = k.shape[2]
    g = h // k.shape[1]
    cd = _compute_dtype(q.dtype)
    kx, vx = _expand_kv(k, g).to(cd), _expand_kv(v, g).to(cd)
    out = torch.zeros(b, h, sq, v.shape[-1], dtype=cd, device=q.device)
    lse = torch.full((b, h, sq), float("-inf"), dtype=cd, device=q.device)
    for i0 in range(0, sq, block_q):
        i1 = min(sq, i0 + block_q)
        lo, hi = _key_range(i0, i1, sk, causal, window)
        if hi <= lo:
            continue
        s = (q[:, :, i0:i1].to(cd) @ kx[:, :, lo:hi].transpose(-1, -2)) * scale
        keep = _block_keep(i0, i1, lo, hi, causal, window, q.device)
        s = s.masked_fill(~keep, float("-inf"))
        m = torch.logsumexp(s, -1)
        p = torch.exp(s - m.masked_fill(m == float("-inf"), 0.0)[..., None])
        out[:, :, i0:i1] = p @ vx[:, :, lo:hi]
        lse[:, :, i0:i1] = m
    return out.to(q.dtype), lse.to(_lse_dtype(q.dtype))


def blockwise_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       causal: bool, scale: float, window: Window | None,
                       block_q: int = BLOCK_Q) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`blockwise_forward` from the saved ``out``/``lse`` (no forward rerun):
    per query block P = exp(S - lse), dV += P^T dO, dS = P * (dO V^T - rowsum(dO * O)),
    dQ = scale * dS K, dK += scale * dS^T Q."""
    b, h, sq, d = q.shape
    sk = k.shape[2]
    g = h // k.shape[1]
    cd = _compute_dtype(q.dtype)
    kx, vx = _expand_kv(k, g).to(cd), _expand_kv(v, g).to(cd)
    qc, doc = q.to(cd), dout.to(cd)
    delta = (doc * out.to(cd)).sum(-1)
    lse_c = lse.to(cd)
    dq = torch.zeros(b, h, sq, d, dtype=cd, device=q.device)
    dk = torch.zeros(b, h, sk, d, dtype=cd, device=q.device)
    dv = torch.zeros(b, h, sk, v.shape[-1], dtype=cd, device=q.device)
    for i0 in range(0, sq, block_q):
        i1 = min(sq, i0 + block_q)
        lo, hi = _key_range(i0, i1, sk, causal, window)
        if hi <= lo:
            continue
        s = (qc[:, :, i0:i1] @ kx[:, :, lo:hi].transpose(-1, -2)) * scale
        keep = _block_keep(i0, i1, lo, hi, causal, window, q.device)
        m = lse_c[:, :, i0:i1, None]
        p = torch.exp(s - m.masked_fill(m == float("-inf"), 0.0)).masked_fill(~keep, 0.0)
        do_blk = doc[:, :, i0:i1]
        dv[:, :, lo:hi] += p.transpose(-1, -2) @ do_blk
        ds = p * (do_blk @ vx[:, :, lo:hi].transpose(-1, -2) - delta[:, :, i0:i1, None])
        dq[:, :, i0:i1] = (ds @ kx[:, :, lo:hi]) * scale
        dk[:, :, lo:hi] += (ds.transpose(-1, -2) @ qc[:, :, i0:i1]) * scale
    return dq.to(q.dtype), _reduce_kv(dk, g).to(k.dtype), _reduce_kv(dv, g).to(v.dtype)


# --- aten backend ------------------------------------------------------------------------------
# CPU: the flash-attention-for-CPU ops (GQA by expanding K/V).
# CUDA: ``_scaled_dot_product_flash_attention`` for fp16/bf16 (GQA natively, head dim padded to
# a multiple of 8 as SDPA does), else ``_scaled_dot_product_efficient_attention`` with
# ``compute_log_sumexp=True`` (fp32; GQA by expanding K/V; causal is top-left aligned as in
# SDPA, which is why a causal call with seq_q != seq_k also takes the efficient op). The
# efficient op pads its lse along seq to a multiple of 32: we slice it to [b, h, s] and pad it
# back (values never read) before the backward.
def _aten_cpu_forward(q, k, v, causal, scale):
    g = q.shape[1] // k.shape[1]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, _expand_kv(k, g), _expand_kv(v, g), 0.0, causal, scale=scale)
    return out, lse


def _aten_cpu_backward(dout, q, k, v, out, lse, causal, scale):
    g = q.shape[1] // k.shape[1]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, _expand_kv(k, g), _expand_kv(v, g), out, lse, 0.0, causal, scale=scale)
    return dq, _reduce_kv(dk, g), _reduce_kv(dv, g)


_EFFICIENT_LSE_ALIGN = 32


def _aten_cuda_uses_flash(q: Tensor, k: Tensor, causal: bool) -> bool:
    return (q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and not (causal and q.shape[2] != k.shape[2]))


def _pad_head_dim(x: Tensor, multiple: int = 8) -> Tensor:
    d = x.shape[-1]
    return x if d % multiple == 0 else torch.nn.functional.pad(x, (0, multiple - d % multiple))


def _dropout_free_rng(device: torch.device) -> tuple[Tensor, Tensor]:
    # The flash/efficient ops read their philox seed/offset only when dropout_p > 0; we never
    # use dropout, so placeholders of the forward's shapes are passed to the backward.
    return (torch.zeros(2, dtype=torch.int64, device=device),
            torch.zeros((), dtype=torch.int64, device=device))


def _aten_cuda_forward(q, k, v, causal, scale):
    aten = torch.ops.aten
    if _aten_cuda_uses_flash(q, k, causal):
        d = q.shape[-1]
        res = aten._scaled_dot_product_flash_attention(
            _pad_head_dim(q), _pad_head_dim(k), _pad_head_dim(v), 0.0, causal, False, scale=scale)
        out, lse = res[0], res[1]
        return out[..., :d], lse
    g = q.shape[1] // k.shape[1]
    out, lse, _seed, _offset = aten._scaled_dot_product_efficient_attention(
        q, _expand_kv(k, g), _expand_kv(v, g), None, True, 0.0, causal, scale=scale)
    return out, lse[:, :, : q.shape[2]]


def _aten_cuda_backward(dout, q, k, v, out, lse, causal, scale):
    aten = torch.ops.aten
    s_q, s_k = q.shape[2], k.shape[2]
    if _aten_cuda_uses_flash(q, k, causal):
        d = q.shape[-1]
        seed, offset = _dropout_free_rng(q.device)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            _pad_head_dim(dout), _pad_head_dim(q), _pad_head_dim(k), _pad_head_dim(v),
            _pad_head_dim(out), lse, None, None, s_q, s_k, 0.0, causal, seed, offset,
            scale=scale)
        return dq[..., :d], dk[..., :d], dv[..., :d]
    g = q.shape[1] // k.shape[1]
    padded = -(-s_q // _EFFICIENT_LSE_ALIGN) * _EFFICIENT_LSE_ALIGN
    lse_p = torch.nn.functional.pad(lse, (0, padded - s_q)) if padded != s_q else lse
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    offset = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _dbias = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, _expand_kv(k, g), _expand_kv(v, g), None, out, lse_p.contiguous(),
        seed, offset, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, _reduce_kv(dk, g), _reduce_kv(dv, g)


# Windows: torch's CPU flash op has none, so a windowed call on CPU takes the blockwise path
# above (exact, memory bounded by one block of the band). On CUDA, fp16/bf16 with
# seq_q == seq_k takes ``aten._flash_attention_forward``/``_backward``, which accept
# ``window_size_left/right`` (flash-attn's kernels, [b, s, h, d] layout, GQA native); any
# other windowed CUDA call takes the blockwise path too.
def _aten_cuda_window_uses_flash(q: Tensor, k: Tensor) -> bool:
    return (q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and q.shape[2] == k.shape[2])


def _aten_cuda_window_forward(q, k, v, causal, scale, window):
    d = q.shape[-1]
    qt, kt, vt = (_pad_head_dim(x.transpose(1, 2)) for x in (q, k, v))
    s_q, s_k = q.shape[2], k.shape[2]
    res = torch.ops.aten._flash_attention_forward(
        qt, kt, vt, None, None, s_q, s_k, 0.0, causal, False, scale=scale,
        window_size_left=window[0], window_size_right=window[1])
    return res[0][..., :d].transpose(1, 2), res[1]


def _aten_cuda_window_backward(dout, q, k, v, out, lse, causal, scale, window):
    d = q.shape[-1]
    dot, qt, kt, vt, ot = (_pad_head_dim(x.transpose(1, 2)) for x in (dout, q, k, v, out))
    s_q, s_k = q.shape[2], k.shape[2]
    seed, offset = _dropout_free_rng(q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dot, qt, kt, vt, ot, lse.contiguous(), None, None, s_q, s_k, 0.0, causal, seed, offset,
        scale=scale, window_size_left=window[0], window_size_right=window[1])
    return tuple(x[..., :d].transpose(1, 2) for x in (dq, dk, dv))


def _aten_forward(q, k, v, causal, scale, window=None):
    w = normalize_window(window, causal, q.shape[2], k.shape[2])
    if w is not None:
        if q.device.type == "cuda" and _aten_cuda_window_uses_flash(q, k):
            return _aten_cuda_window_forward(q, k, v, causal, scale, w)
        return blockwise_forward(q, k, v, causal, scale, w)
    if q.device.type == "cpu":
        return _aten_cpu_forward(q, k, v, causal, scale)
    return _aten_cuda_forward(q, k, v, causal, scale)


def _aten_backward(dout, q, k, v, out, lse, causal, scale, window=None):
    w = normalize_window(window, causal, q.shape[2], k.shape[2])
    if w is not None:
        if q.device.type == "cuda" and _aten_cuda_window_uses_flash(q, k):
            return _aten_cuda_window_backward(dout, q, k, v, out, lse, causal, scale, w)
        return blockwise_backward(dout, q, k, v, out, lse, causal, scale, w)
    if q.device.type == "cpu":
        return _aten_cpu_backward(dout, q, k, v, out, lse, causal, scale)
    return _aten_cuda_backward(dout, q, k, v, out, lse, causal, scale)


def _aten_unsupported(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    if device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"limited to fp16/bf16/fp32 on CUDA, not {dtype}"
    return None


register_backend(AttentionBackend(
    "aten", _aten_forward, _aten_backward, lambda device: device.type in ("cpu", "cuda"),
    _aten_unsupported))


def _register_optional_backends() -> None:
    # flash_attn first (preferred on CUDA), triton last. Both modules import their heavy
    # dependencies lazily, so registering them costs nothing on machines without them.
    from . import flash_attn_backend as fa
    from . import triton_attention as tr

    register_backend(AttentionBackend("flash_attn", fa.flash_attn_forward, fa.flash_attn_backward,
                                      fa.available, fa.unsupported, documents=True), first=True)
    register_backend(AttentionBackend("triton", tr.triton_attention_forward,
                                      tr.triton_attention_backward, tr.available,
                                      tr.unsupported, documents=True))


_register_optional_backends()


# --- documents ---------------------------------------------------------------------------------
def _document_slices(doc_ids: Tensor):
    """``(batch slice, seq slice)`` pairs covering every document once: all rows at a time
    when every row has the same boundaries, else one row at a time."""
    runs = document_runs(doc_ids)
    if all(r == runs[0] for r in runs):
        return [(slice(None), slice(a, b)) for a, b in runs[0]]
    return [(slice(row, row + 1), slice(a, b)) for row, r in enumerate(runs) for a, b in r]


def per_document_forward(backend: AttentionBackend, q, k, v, causal, scale, window, doc_ids):
    """A backend without document support run once per document; a windowed document keeps its
    window (positions shift alike for queries and keys)."""
    b, h, s, _ = q.shape
    out = q.new_empty((b, h, s, v.shape[-1]))
    lse = q.new_empty((b, h, s), dtype=_lse_dtype(q.dtype))
    for rows, seq in _document_slices(doc_ids):
        o, m = backend.forward(q[rows, :, seq], k[rows, :, seq], v[rows, :, seq], causal, scale,
                               *_window_args(window))
        out[rows, :, seq] = o
        lse[rows, :, seq] = m
    return out, lse


def per_document_backward(backend: AttentionBackend, dout, q, k, v, out, lse, causal, scale, window,
                          doc_ids):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for rows, seq in _document_slices(doc_ids):
        parts = backend.backward(dout[rows, :, seq].contiguous(), q[rows, :, seq], k[rows, :, seq],
                                 v[rows, :, seq], out[rows, :, seq], lse[rows, :, seq].contiguous(),
                                 causal, scale, *_window_args(window))
        for grad, part in zip((dq, dk, dv), parts, strict=True):
            grad[rows, :, seq] = part
    return dq, dk, dv


@torch.library.custom_op("helix::document_ids", mutates_args=())
def document_ids(position_ids: Tensor | None, segment_ids: Tensor | None,
                 attention_mask: Tensor | None) -> Tensor:
    """``[batch, seq]`` int32 document index per token, from whichever inputs the model has:
    a document starts where ``position_ids`` do not continue by +1 (Hugging Face's packed
    format), where ``segment_ids`` (per-token document ids) change, and at the first padding
    token of ``attention_mask`` (right padding: the padding is a document of its own, which
    no real token sees)."""
    given = [t for t in (position_ids, segment_ids, attention_mask) if t is not None]
    if not given:
        raise HelixError("helix::document_ids needs position_ids, segment_ids or attention_mask")
    start = torch.zeros(given[0].shape, dtype=torch.bool, device=given[0].device)
    if position_ids is not None:
        start[:, 1:] |= position_ids[:, 1:] != position_ids[:, :-1] + 1
    if segment_ids is not None:
        start[:, 1:] |= segment_ids[:, 1:] != segment_ids[:, :-1]
    if attention_mask is not None:
        start[:, 1:] |= attention_mask[:, 1:] != attention_mask[:, :-1]
    return start.to(torch.int32).cumsum(-1, dtype=torch.int32)


@document_ids.register_fake
def _(position_ids, segment_ids, attention_mask):
    t = next(x for x in (position_ids, segment_ids, attention_mask) if x is not None)
    return t.new_empty(t.shape, dtype=torch.int32)


# --- the op ----------------------------------------------------------------------------------
def _check(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None = None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise HelixError(f"helix::attention takes [batch, heads, seq, head_dim] tensors; got "
                         f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[1] % k.shape[1] != 0:
        raise HelixError(f"helix::attention: K/V heads must divide Q heads and K, V must match; "
                         f"got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if doc_ids is not None:
        check_doc_ids(doc_ids, q.shape[0], q.shape[2], k.shape[2])


def _window_args(window) -> tuple:
    """Positional window argument for a backend call: none when the call has no window."""
    return () if window is None or tuple(window) == (-1, -1) else (tuple(int(w) for w in window),)


def _single_document(doc_ids: Tensor | None) -> bool:
    return doc_ids is None or doc_ids.shape[1] == 0 or bool((doc_ids[:, -1] == doc_ids[:, 0]).all())


def run_forward(backend: AttentionBackend, q, k, v, doc_ids, causal, scale, window):
    if _single_document(doc_ids):
        return backend.forward(q, k, v, causal, scale, *_window_args(window))
    if backend.documents:
        return backend.forward(q, k, v, causal, scale, *_window_args(window), doc_ids=doc_ids)
    return per_document_forward(backend, q, k, v, causal, scale, window, doc_ids)


def run_backward(backend: AttentionBackend, dout, q, k, v, out, lse, doc_ids, causal, scale, window):
    if _single_document(doc_ids):
        return backend.backward(dout, q, k, v, out, lse, causal, scale, *_window_args(window))
    if backend.documents:
        return backend.backward(dout, q, k, v, out, lse, causal, scale, *_window_args(window),
                                doc_ids=doc_ids)
    return per_document_backward(backend, dout, q, k, v, out, lse, causal, scale, window, doc_ids)


@torch.library.custom_op("helix::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None = None, *, causal: bool,
              scale: float, window: list[int] | None = None) -> tuple[Tensor, Tensor]:
    _check(q, k, v, doc_ids)
    normalize_window(window, causal, q.shape[2], k.shape[2])  # validates
    backend = select_backend(q.device, q.dtype, q.shape[-1])
    out, lse = run_forward(backend, q, k, v, doc_ids, causal, scale, window)
    return out.contiguous(), lse.contiguous()


@attention.register_fake
def _(q, k, v, doc_ids=None, *, causal, scale, window=None):
    b, h, s, _ = q.shape
    return q.new_empty((b, h, s, v.shape[-1])), q.new_empty((b, h, s), dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("helix::attention_backward", mutates_args=())
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       doc_ids: Tensor | None = None, *, causal: bool, scale: float,
                       window: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    backend = select_backend(q.device, q.dtype, q.shape[-1])
    dq, dk, dv = run_backward(backend, dout.contiguous(), q, k, v, out, lse, doc_ids, causal, scale, window)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, doc_ids=None, *, causal, scale, window=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    q, k, v = inputs[:3]
    doc_ids = inputs[3] if len(inputs) > 3 else None
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, doc_ids)
    ctx.kwargs = dict(keyword_only_inputs)


def _backward(ctx, dout, dlse):
    # dlse: the lse output is for the runtime/recompute machinery only, never differentiated.
    q, k, v, out, lse, doc_ids = ctx.saved_tensors
    if dout is None:
        return None, None, None, None
    return (*attention_backward(dout, q, k, v, out, lse, doc_ids, **ctx.kwargs), None)


attention.register_autograd(_backward, setup_context=_setup_context)


def _flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    # Dense count, as FlopCounterMode counts SDPA: QK^T and PV, 2 FLOPs per MAC.
    b, h, s_q, d = q_shape
    s_k = k_shape[2]
    return 4 * b * h * s_q * s_k * d


def _bwd_flops(dout_shape, q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    # dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q (FlopCounterMode's SDPA backward rule).
    b, h, s_q, d = q_shape
    s_k = k_shape[2]
    return 8 * b * h * s_q * s_k * d


register_flop_formula(torch.ops.helix.attention)(_flops)
register_flop_formula(torch.ops.helix.attention_backward)(_bwd_flops)
