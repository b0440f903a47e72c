"""The run-time half of MLP chunking: what a graph rewritten by ``passes.mlp_chunk`` calls.

``chunked_gelu_mlp`` / ``chunked_swiglu_mlp`` compute a token-wise MLP in ``num_chunks``
pieces along the sequence; with ``recompute=True`` a ``torch.autograd.Function`` saves only
the input and re-runs each chunk in backward, so no [s, ffn] tensor ever exists whole. The
semantics and numerics are described in ``helix_compiler.passes.mlp_chunk``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import HelixError

aten = torch.ops.aten
LINEAR = aten.linear.default


def _chunk_bounds(length: int, num_chunks: int) -> list[tuple[int, int]]:
    """(start, length) of ``tensor_split(num_chunks)``: the first ``length % n`` are one longer."""
    q, r = divmod(length, num_chunks)
    bounds, start = [], 0
    for i in range(num_chunks):
        n = q + (1 if i < r else 0)
        bounds.append((start, n))
        start += n
    return bounds


def _check_runtime(x: Tensor, num_chunks: int, seq_dim: int, name: str) -> None:
    length = x.shape[seq_dim]
    if num_chunks > length:
        raise HelixError(f"chunk_mlp: node {name!r} runs with num_chunks={num_chunks} but the "
                         f"sequence (dim {seq_dim} of x{tuple(x.shape)}) has only {length} "
                         f"tokens; use num_chunks <= {length}")


def _gelu_mlp(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, *,
              approximate: str, activation_backend: str | None) -> Tensor:
    from .triton_activation import bias_gelu, resolve_backend

    if resolve_backend(x, activation_backend) == "triton":
        act = bias_gelu(LINEAR(x, w1), b1, approximate, backend="triton")
    else:
        act = aten.gelu.default(LINEAR(x, w1, b1), approximate=approximate)
    return LINEAR(act, w2, b2)


def _swiglu_mlp(x: Tensor, wg: Tensor, bg: Tensor | None, wu: Tensor, bu: Tensor | None,
                wd: Tensor, bd: Tensor | None, *, activation_backend: str | None) -> Tensor:
    from .triton_activation import resolve_backend, silu_mul

    gate, up = LINEAR(x, wg, bg), LINEAR(x, wu, bu)
    if resolve_backend(x, activation_backend) == "triton":
        act = silu_mul(gate, up, backend="triton")
    else:
        act = aten.mul.Tensor(aten.silu.default(gate), up)
    return LINEAR(act, wd, bd)


class ChunkedRecomputeMLP(torch.autograd.Function):
    """Forward chunk by chunk without saving intermediates; backward recomputes and
    differentiates chunk by chunk. ``fn(x_chunk, *params) -> out_chunk`` is token-wise."""

    @staticmethod
    def forward(ctx, fn: Callable[..., Tensor], num_chunks: int, seq_dim: int, x: Tensor,
                *params: Tensor | None) -> Tensor:
        bounds = _chunk_bounds(x.shape[seq_dim], num_chunks)
        out = None
        for start, n in bounds:
            y = fn(x.narrow(seq_dim, start, n), *params)
            if out is None:
                shape = list(x.shape[:-1]) + [y.shape[-1]]
                out = y.new_empty(shape)
            out.narrow(seq_dim, start, n).copy_(y)
            del y
        ctx.fn, ctx.seq_dim, ctx.bounds = fn, seq_dim, bounds
        ctx.param_is_none = [p is None for p in params]
        ctx.save_for_backward(x, *[p for p in params if p is not None])
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        x, *present = ctx.saved_tensors
        it = iter(present)
        params = [None if none else next(it) for none in ctx.param_is_none]
        needs = ctx.needs_input_grad[3:]
        need_x, need_p = needs[0], needs[1:]
        seq_dim = ctx.seq_dim

        leaves = [p.detach().requires_grad_(bool(need)) if p is not None else None
                  for p, need in zip(params, need_p, strict=True)]
        wrt_idx = [i for i, (p, need) in enumerate(zip(params, need_p, strict=True))
                   if p is not None and need]
        acc: list[Tensor | None] = [None] * len(params)
        dx = torch.empty_like(x) if need_x else None
        for start, n in ctx.bounds:
            with torch.enable_grad():
                xc = x.narrow(seq_dim, start, n).detach().requires_grad_(need_x)
                y = ctx.fn(xc, *leaves)
                inputs = ([xc] if need_x else []) + [leaves[i] for i in wrt_idx]
                if not inputs:
                    break
                grads = torch.autograd.grad(y, inputs, dout.narrow(seq_dim, start, n))
            del y
            if need_x:
                dx.narrow(seq_dim, start, n).copy_(grads[0])
                grads = grads[1:]
            for i, g in zip(wrt_idx, grads, strict=True):
                if acc[i] is None:
                    acc[i] = g.float() if g.dtype in (torch.float16, torch.bfloat16) else g
                else:
                    acc[i] += g
            del grads
        pgrads = [None if a is None else a.to(params[i].dtype) for i, a in enumerate(acc)]
        return (None, None, None, dx, *pgrads)


def _run_chunked(fn: Callable[..., Tensor], x: Tensor, params: Sequence[Tensor | None], *,
                 num_chunks: int, seq_dim: int, recompute: bool, name: str) -> Tensor:
    seq_dim = seq_dim % x.dim()
    _check_runtime(x, num_chunks, seq_dim, name)
    if recompute:
        return ChunkedRecomputeMLP.apply(fn, num_chunks, seq_dim, x, *params)
    return torch.cat([fn(xc, *params) for xc in x.tensor_split(num_chunks, seq_dim)], seq_dim)


def chunked_gelu_mlp(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, *,
                     approximate: str = "none", num_chunks: int, seq_dim: int,
                     recompute: bool = True, activation_backend: str | None = None,
                     name: str = "") -> Tensor:
    """``linear(gelu(linear(x, w1, b1)), w2, b2)`` in ``num_chunks`` pieces along ``seq_dim``."""
    def fn(xc, w1, b1, w2, b2):
        return _gelu_mlp(xc, w1, b1, w2, b2, approximate=approximate,
                         activation_backend=activation_backend)
    return _run_chunked(fn, x, (w1, b1, w2, b2), num_chunks=num_chunks, seq_dim=seq_dim,
                        recompute=recompute, name=name)


def chunked_swiglu_mlp(x: Tensor, wg: Tensor, bg: Tensor | None, wu: Tensor, bu: Tensor | None,
                       wd: Tensor, bd: Tensor | None, *, num_chunks: int, seq_dim: int,
                       recompute: bool = True, activation_backend: str | None = None,
                       name: str = "") -> Tensor:
    """``linear(silu(linear(x, wg, bg)) * linear(x, wu, bu), wd, bd)`` in chunks along seq."""
    def fn(xc, wg, bg, wu, bu, wd, bd):
        return _swiglu_mlp(xc, wg, bg, wu, bu, wd, bd, activation_backend=activation_backend)
    return _run_chunked(fn, x, (wg, bg, wu, bu, wd, bd), num_chunks=num_chunks,
                        seq_dim=seq_dim, recompute=recompute, name=name)
