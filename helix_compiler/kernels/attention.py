"""``helix::attention(q, k, v, *, causal, scale) -> (out, lse)``: the one attention op of a
canonical graph.

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

ENV_VAR = "HELIX_ATTENTION_BACKEND"


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    forward: Callable[..., tuple[Tensor, Tensor]]  # (q, k, v, causal, scale) -> (out, lse)
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]  # (dout, q, k, v, out, lse, causal, scale)
    available: Callable[[torch.device], bool]  # usable on this device?
    # Optional finer check: None if (device, dtype, head_dim) is supported, else the reason.
    unsupported: Callable[[torch.device, torch.dtype, int], str | None] | None = None

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


def _aten_forward(q, k, v, causal, scale):
    if q.device.type == "cpu":
        return _aten_cpu_forward(q, k, v, causal, scale)
    return _aten_cuda_forward(q, k, v, causal, scale)


def _aten_backward(dout, q, k, v, out, lse, causal, scale):
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
                                      fa.available, fa.unsupported), first=True)
    register_backend(AttentionBackend("triton", tr.triton_attention_forward,
                                      tr.triton_attention_backward, tr.available,
                                      tr.unsupported))


_register_optional_backends()


# --- the op ----------------------------------------------------------------------------------
def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise HelixError(f"helix::attention takes [batch, heads, seq, head_dim] tensors; got "
                         f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[1] % k.shape[1] != 0:
        raise HelixError(f"helix::attention: K/V heads must divide Q heads and K, V must match; "
                         f"got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")


@torch.library.custom_op("helix::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    _check(q, k, v)
    out, lse = select_backend(q.device, q.dtype, q.shape[-1]).forward(q, k, v, causal, scale)
    return out.contiguous(), lse.contiguous()


@attention.register_fake
def _(q, k, v, *, causal, scale):
    b, h, s, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (b, h, s), dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("helix::attention_backward", mutates_args=())
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       *, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    backend = select_backend(q.device, q.dtype, q.shape[-1])
    dq, dk, dv = backend.backward(dout.contiguous(), q, k, v, out, lse, causal, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, *, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal = keyword_only_inputs["causal"]
    ctx.scale = keyword_only_inputs["scale"]


def _backward(ctx, dout, dlse):
    # dlse: the lse output is for the runtime/recompute machinery only, never differentiated.
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        return None, None, None
    return attention_backward(dout, q, k, v, out, lse, causal=ctx.causal, scale=ctx.scale)


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
