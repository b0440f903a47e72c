"""The ``triton`` backend of ``helix::attention``: FlashAttention-2 in Triton.

Forward writes ``(out, lse)``; backward consumes them (no forward rerun): a preprocessing
kernel computes ``delta = rowsum(dO * O)``, one kernel per K/V block accumulates dK/dV over
every query head of its GQA group, one kernel per Q block accumulates dQ (two passes, no
atomics). Causal and non-causal, sliding windows ``(left, right)`` (blocks outside the band
are skipped by the loop bounds), document masking (``doc_ids=``: masked by id equality inside
the blocks, blocks of other documents skipped by the loop bounds), any sequence length
(masked tails), GQA, fp32/fp16/bf16, head dims up to 256 (64 and 128 are the tuned ones; any
other is padded to a power of two inside the kernel by masking).

Available on CUDA (when ``triton`` imports) and, for CPU tensors, only when
``TRITON_INTERPRET=1`` is set: the kernels are ``triton.jit``-wrapped on first use, keyed by
that setting, so importing this module never fixes the mode.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor

from ..errors import HelixError


def interpreting() -> bool:
    """Do Triton kernels run in the interpreter here (for CPU tensors)?

    That needs ``TRITON_INTERPRET=1`` *before triton is first imported*: triton's own
    ``tl.sum``, ``tl.max``, ``tl.sigmoid``... are ``triton.jit``-wrapped at import time in the
    mode of that moment, and compiled-mode ones cannot be called from interpreted kernels.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if "triton" not in sys.modules:
        return True  # it will be imported in interpreter mode
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(std.sum, InterpretedFunction)


def _check_mode(device: torch.device) -> None:
    if device.type != "cuda" and not interpreting():
        raise HelixError(
            f"Triton kernels on {device} tensors need the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is first imported (it is set="
            f"{os.environ.get('TRITON_INTERPRET')!r}, triton imported="
            f"{'triton' in sys.modules})")


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def lazily_jitted(source: str, **kernels: str) -> Callable[[], SimpleNamespace]:
    """``triton.jit`` the named functions of module ``source`` on first use, once per mode
    (compiled or interpreted: the two cannot share wrapped functions)."""
    cache: dict[bool, SimpleNamespace] = {}

    def get() -> SimpleNamespace:
        interp = interpreting()
        ns = cache.get(interp)
        if ns is None:
            import triton

            src = importlib.import_module(source, __package__)
            ns = SimpleNamespace(**{name: triton.jit(getattr(src, fn)) for name, fn in kernels.items()})
            cache[interp] = ns
        return ns

    return get


_kernels = lazily_jitted("._triton_attention_kernels", fwd="attn_fwd_kernel", pre="attn_bwd_preprocess_kernel",
                         dkdv="attn_bwd_dkdv_kernel", dq="attn_bwd_dq_kernel")


@dataclass(frozen=True)
class BlockConfig:
    fwd_m: int
    fwd_n: int
    dkdv_m: int
    dkdv_n: int
    dq_m: int
    dq_n: int
    num_warps: int = 4
    num_stages: int = 2


def _block_d(head_dim: int) -> int:
    return max(16, triton_next_pow2(head_dim))


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def default_config(device: torch.device, dtype: torch.dtype, head_dim: int) -> BlockConfig:
    """Block sizes. The GPU ones are conservative for shared memory on A100/H100 (not tuned:
    no GPU was available when this was written); the interpreter uses 16 so that small test
    sequences cross several blocks."""
    if device.type != "cuda":
        return BlockConfig(16, 16, 16, 16, 16, 16, num_warps=1, num_stages=1)
    bd = _block_d(head_dim)
    if dtype == torch.float32:
        return BlockConfig(64, 32, 32, 32, 32, 32, num_warps=4, num_stages=2)
    if bd <= 64:
        return BlockConfig(128, 64, 32, 128, 128, 32, num_warps=4, num_stages=3)
    if bd <= 128:
        return BlockConfig(128, 64, 32, 64, 64, 32, num_warps=8, num_stages=2)
    return BlockConfig(64, 32, 16, 32, 32, 16, num_warps=8, num_stages=1)


def _mode(dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    upcast = device.type != "cuda" or dtype == torch.float32
    return upcast, "ieee" if upcast else "tf32"


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _strides(x: Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


def _window_args(window, causal: bool, sq: int, sk: int) -> tuple[tuple[int, int], dict]:
    from .attention import normalize_window

    w = normalize_window(window, causal, sq, sk)
    left, right = w if w is not None else (-1, -1)
    return (max(left, 0), max(right, 0)), dict(HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0)


def _doc_args(doc_ids: Tensor | None, q: Tensor, k: Tensor) -> tuple[tuple, dict]:
    """Kernel arguments ``DOC, DSTART, DEND, sib, sis`` and the ``HAS_DOCS`` flag: int32
    contiguous ``[b, s]`` ids and per-token document spans (see ``documents.document_spans``);
    a 1-element placeholder (never read) without documents."""
    if doc_ids is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        return (dummy, dummy, dummy, 0, 0), dict(HAS_DOCS=False)
    from .documents import check_doc_ids, document_spans

    check_doc_ids(doc_ids, q.shape[0], q.shape[2], k.shape[2])
    ids = doc_ids.to(device=q.device, dtype=torch.int32).contiguous()
    start, end = document_spans(ids)
    assert start.stride() == ids.stride() == end.stride(), (start.stride(), ids.stride())
    return (ids, start, end, *_strides(ids)), dict(HAS_DOCS=True)


def triton_attention_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                             window: tuple[int, int] | None = None,
                             config: BlockConfig | None = None, *,
                             doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    wargs, wflags = _window_args(window, causal, sq, sk)
    dargs, dflags = _doc_args(doc_ids, q, k)
    _check_mode(q.device)
    cfg = config or default_config(q.device, q.dtype, d)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, h, sq), dtype=_lse_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    upcast, precision = _mode(q.dtype, q.device)
    grid = (_cdiv(sq, cfg.fwd_m), b * h)
    _kernels().fwd[grid](
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        *_strides(lse), h, sq, sk, d, scale * _LOG2E, *wargs, *dargs,
        GROUPS=h // hkv, CAUSAL=causal, **wflags, **dflags, BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n,
        BLOCK_D=_block_d(d), UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def triton_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                              lse: Tensor, causal: bool, scale: float,
                              window: tuple[int, int] | None = None,
                              config: BlockConfig | None = None, *,
                              doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    wargs, wflags = _window_args(window, causal, sq, sk)
    dargs, dflags = _doc_args(doc_ids, q, k)
    _check_mode(q.device)
    cfg = config or default_config(q.device, q.dtype, d)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    delta = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    upcast, precision = _mode(q.dtype, q.device)
    kernels = _kernels()
    bd = _block_d(d)
    kernels.pre[(_cdiv(sq, cfg.dq_m), b * h)](
        out, dout, delta, *_strides(out), *_strides(dout), *_strides(delta), h, sq, d,
        BLOCK_M=cfg.dq_m, BLOCK_D=bd)
    assert lse.stride() == delta.stride(), (lse.stride(), delta.stride())
    common = dict(GROUPS=h // hkv, CAUSAL=causal, **wflags, **dflags, BLOCK_D=bd, UPCAST=upcast,
                  DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    kernels.dkdv[(_cdiv(sk, cfg.dkdv_n), b * hkv)](
        q, k, v, dout, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v),
        *_strides(dout), *_strides(lse), *_strides(dk), *_strides(dv),
        hkv, sq, sk, d, scale, scale * _LOG2E, *wargs, *dargs,
        BLOCK_M=cfg.dkdv_m, BLOCK_N=cfg.dkdv_n, **common)
    kernels.dq[(_cdiv(sq, cfg.dq_m), b * h)](
        q, k, v, dout, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v),
        *_strides(dout), *_strides(lse), *_strides(dq),
        h, sq, sk, d, scale, scale * _LOG2E, *wargs, *dargs,
        BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n, **common)
    return dq, dk, dv


_LOG2E = 1.4426950408889634


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def available(device: torch.device) -> bool:
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def unsupported(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"limited to fp32/fp16/bf16, not {dtype}"
    if head_dim > 256:
        return f"limited to head_dim <= 256, not {head_dim}"
    return None
