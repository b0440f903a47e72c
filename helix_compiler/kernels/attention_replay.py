"""How ``helix::attention`` runs inside a segment, per recompute policy (the run-time half;
``lowering.stage_program`` routes a segment's attention nodes here).

In the default "direct" mode :func:`attention` is the op. Under ``without_attention`` the
no-grad forward runs in "record" mode (the op's ``out`` and ``lse`` are kept), and the
backward's recompute of the pre-function runs in "replay" mode: the recorded ``out``/``lse``
are returned through an autograd function whose backward is ``helix::attention_backward``.
So the attention forward never runs twice, while the QKV projection and the rest of the
pre-function are recomputed. The document ids and the keyword arguments of the op (causal, scale, window, ...) pass
through unchanged to both the forward and the backward op.
"""

from __future__ import annotations

import contextlib

import torch

from . import attention as _op  # noqa: F401  (registers helix::attention)
from .attention_autocast import autocast_inputs

HELIX_ATTENTION = torch.ops.helix.attention.default


class _State:
    mode = "direct"
    cache: list | None = None
    index = 0


_state = _State()


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, out, lse, kwargs):
        ctx.save_for_backward(q, k, v, doc_ids, out, lse)
        ctx.kwargs = kwargs
        return out.detach(), lse.detach()

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, doc_ids, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.helix.attention_backward(dout, q, k, v, out, lse, doc_ids, **ctx.kwargs)
        return dq, dk, dv, None, None, None, None


def attention(q, k, v, doc_ids=None, **kwargs):
    if _state.mode == "direct":
        return HELIX_ATTENTION(q, k, v, doc_ids, **kwargs)
    if _state.mode == "record":
        with torch.no_grad():
            out, lse = HELIX_ATTENTION(q, k, v, doc_ids, **kwargs)
        _state.cache.append((out, lse))
        return out, lse
    out, lse = _state.cache[_state.index]
    _state.index += 1
    q, k, v = autocast_inputs(q, k, v)  # the casts the op's autocast rule made in the forward
    return _Replay.apply(q, k, v, doc_ids, out, lse, kwargs)


@contextlib.contextmanager
def mode(name: str, cache: list | None = None):
    """Run attention ``"direct"``, ``"record"`` (into ``cache``) or ``"replay"`` (from it)."""
    prev = (_state.mode, _state.cache, _state.index)
    _state.mode, _state.cache, _state.index = name, cache, 0
    try:
        yield
    finally:
        _state.mode, _state.cache, _state.index = prev
