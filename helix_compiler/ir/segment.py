"""The segment chain: the path every micro batch takes through the model.

A model with L layers is cut into ``2L + 2`` segments, in this order::

    E, A1, P1, A2, P2, ..., AL, PL, H

``E`` = embedding + pre-attention of layer 1; ``Al`` = attention of layer l (with the
pre-attention ops the min-cut moved onto the attention stage, e.g. the QKV projection);
``Pl`` = post-attention of layer l + pre-attention of layer l+1 (HelixPipe's parameter
chunk); ``PL`` (kind "final") = post-attention of layer L + final norm; ``H`` = head + loss.
A micro batch visits the segments in chain order, each boundary value travels from a segment
to the next one in the chain (the residual passes through the attention stage, as in the
reference implementation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

KINDS = ("embed", "attn", "param", "final", "head")

# Symbols every cost expression is written in.
B = sympy.Symbol("b", positive=True, integer=True)  # micro batch size
S = sympy.Symbol("s", positive=True, integer=True)  # sequence length

POLICIES = ("none", "without_attention", "full", "selective")


@dataclass(frozen=True)
class SegmentSpec:
    index: int  # position in the chain
    kind: str  # one of KINDS
    layer: int | None  # 1..L for attn/param/final, None for embed/head
    name: str  # "E", "A3", "P3", "H"

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind


def chain_specs(num_layers: int) -> list[SegmentSpec]:
    """The chain of a model with ``num_layers`` layers (see module docstring)."""
    specs = [SegmentSpec(0, "embed", None, "E")]
    for layer in range(1, num_layers + 1):
        specs.append(SegmentSpec(len(specs), "attn", layer, f"A{layer}"))
        kind = "final" if layer == num_layers else "param"
        specs.append(SegmentSpec(len(specs), kind, layer, f"P{layer}"))
    specs.append(SegmentSpec(len(specs), "head", None, "H"))
    return specs


@dataclass(frozen=True)
class SegmentCost:
    """Cost of one segment for one micro batch, as sympy expressions in ``B`` and ``S``.

    FLOP counts follow ``torch.utils.flop_counter.FlopCounterMode`` (attention counted dense,
    as FlopCounterMode counts SDPA); ``attention_flops_fwd`` is the attention part of
    ``flops_fwd`` and ``attention_causal_factor`` the fraction of it a causal kernel does.
    """

    flops_fwd: sympy.Expr
    flops_bwd: sympy.Expr  # input + weight gradients
    flops_bwd_input: sympy.Expr  # input gradients only (zero-bubble B)
    flops_bwd_weight: sympy.Expr  # weight gradients only (zero-bubble W)
    attention_flops_fwd: sympy.Expr
    attention_flops_bwd: sympy.Expr
    recompute_flops: dict[str, sympy.Expr]  # policy -> forward FLOPs rerun in backward
    saved_bytes: dict[str, sympy.Expr]  # policy -> activation bytes kept until backward
    param_bytes: sympy.Expr  # bytes of parameters this segment owns
    out_bytes: sympy.Expr  # bytes sent to the next segment of the chain (0 for H)
    shipped_param_bytes: sympy.Expr = sympy.Integer(0)  # part of out_bytes that is weights
    attention_causal_factor: sympy.Rational = sympy.Rational(1, 2)
    extra: dict[str, sympy.Expr] = field(default_factory=dict)
    # What the runtime holds, per policy, counted by storage (the graph cost model fills them;
    # empty: the simulator derives them from saved_bytes / out_bytes, see sim.costs.op_times):
    held_bytes: dict[str, sympy.Expr] = field(default_factory=dict)  # the stash, F to the end of B
    rerun_bytes: dict[str, sympy.Expr] = field(default_factory=dict)  # what R adds, to the end of B
    out_new_bytes: dict[str, sympy.Expr] = field(default_factory=dict)  # outputs not aliasing the above

    def at(self, b: int, s: int) -> dict[str, float]:
        """Numbers at concrete sizes (policies flattened as ``saved_bytes[policy]``)."""
        env = {B: b, S: s}
        out: dict[str, float] = {}
        for name in ("flops_fwd", "flops_bwd", "flops_bwd_input", "flops_bwd_weight",
                     "attention_flops_fwd", "attention_flops_bwd", "param_bytes", "out_bytes",
                     "shipped_param_bytes"):
            out[name] = float(sympy.sympify(getattr(self, name)).subs(env))
        for pol, e in self.recompute_flops.items():
            out[f"recompute_flops[{pol}]"] = float(sympy.sympify(e).subs(env))
        for field_name in ("saved_bytes", "held_bytes", "rerun_bytes", "out_new_bytes"):
            for pol, e in getattr(self, field_name).items():
                out[f"{field_name}[{pol}]"] = float(sympy.sympify(e).subs(env))
        return out
