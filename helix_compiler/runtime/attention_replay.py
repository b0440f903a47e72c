"""How the runtime runs ``helix::attention`` inside segments, per recompute policy.

Attention segments call :func:`attention` (swapped in for the op by :func:`install`). In the
default "direct" mode it is the op. Under ``without_attention`` the no-grad forward runs in
"record" mode (the op's ``out`` and ``lse`` are kept), and the backward's recompute of the
pre-function runs in "replay" mode: the recorded ``out``/``lse`` are returned through an
autograd function whose backward is ``helix::attention_backward``. So the attention forward
never runs twice, while the QKV projection and the rest of the pre-function are recomputed.
"""

from __future__ import annotations

import contextlib

import torch
import torch.fx as fx

from ..kernels import attention as _op  # noqa: F401

HELIX_ATTENTION = torch.ops.helix.attention.default


class _State:
    mode = "direct"
    cache: list | None = None
    index = 0


_state = _State()


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, out, lse, causal, scale):
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out.detach(), lse.detach()

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.helix.attention_backward(dout, q, k, v, out, lse, causal=ctx.causal, scale=ctx.scale)
        return dq, dk, dv, None, None, None, None


def attention(q, k, v, *, causal: bool, scale: float):
    if _state.mode == "direct":
        return HELIX_ATTENTION(q, k, v, causal=causal, scale=scale)
    if _state.mode == "record":
        with torch.no_grad():
            out, lse = HELIX_ATTENTION(q, k, v, causal=causal, scale=scale)
        _state.cache.append((out, lse))
        return out, lse
    out, lse = _state.cache[_state.index]
    _state.index += 1
    return _Replay.apply(q, k, v, out, lse, causal, scale)


@contextlib.contextmanager
def mode(name: str, cache: list | None = None):
    prev = (_state.mode, _state.cache, _state.index)
    _state.mode, _state.cache, _state.index = name, cache, 0
    try:
        yield
    finally:
        _state.mode, _state.cache, _state.index = prev


def install(gm: fx.GraphModule) -> int:
    """Route the graph's attention nodes through :func:`attention`; returns how many."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (HELIX_ATTENTION, attention):
            node.target = attention
            count += 1
    gm.recompile()
    return count
