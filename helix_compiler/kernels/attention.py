"""``helix::attention(q, k, v, *, causal, scale) -> (out, lse)``: the one attention op of a
canonical graph.

Layout ``[batch, heads, seq, head_dim]``; K/V may have fewer heads than Q (GQA: every
``hq // hkv`` query heads share one K/V head). ``lse`` is the log-sum-exp of the scaled
scores per query row, ``[batch, heads, seq]``, float32 for half inputs. Its backward,
``helix::attention_backward``, consumes the saved ``out`` and ``lse`` and never reruns the
forward: that is what HelixPipe's "recompute everything but attention" relies on.

Backends are looked up in ``BACKENDS`` by name; ``HELIX_ATTENTION_BACKEND`` (or
``set_attention_backend``) forces one, else the first available one for the device wins.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import register_flop_formula
from torch import Tensor

from ..errors import HelixError

ENV_VAR = "HELIX_ATTENTION_BACKEND"


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    forward: Callable[..., tuple[Tensor, Tensor]]  # (q, k, v, causal, scale) -> (out, lse)
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]  # (dout, q, k, v, out, lse, causal, scale)
    available: Callable[[torch.device], bool]  # usable on this device?


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


def select_backend(device: torch.device) -> AttentionBackend:
    name = _forced or os.environ.get(ENV_VAR) or None
    if name is not None:
        if name not in BACKENDS:
            raise HelixError(f"{ENV_VAR}={name!r} is not a known attention backend; "
                             f"use one of {sorted(BACKENDS)}")
        backend = BACKENDS[name]
        if not backend.available(device):
            raise HelixError(f"attention backend {name!r} was forced but is not available on "
                             f"{device}; unset {ENV_VAR} or pick one of "
                             f"{[b for b, v in BACKENDS.items() if v.available(device)]}")
        return backend
    for backend in BACKENDS.values():
        if backend.available(device):
            return backend
    raise HelixError(f"no attention backend is available on {device}")


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _reduce_kv(dx: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return dx
    b, h, s, d = dx.shape
    return dx.view(b, h // groups, groups, s, d).sum(2)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# --- aten backend: CPU flash-attention-for-CPU ops ------------------------------------------
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


register_backend(AttentionBackend(
    "aten", _aten_cpu_forward, _aten_cpu_backward, lambda device: device.type == "cpu"))


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
    out, lse = select_backend(q.device).forward(q, k, v, causal, scale)
    return out.contiguous(), lse.contiguous()


@attention.register_fake
def _(q, k, v, *, causal, scale):
    b, h, s, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (b, h, s), dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("helix::attention_backward", mutates_args=())
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       *, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = select_backend(q.device).backward(dout.contiguous(), q, k, v, out, lse, causal, scale)
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
