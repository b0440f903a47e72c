"""Pass: choose, per layer, which pre-attention ops run on the attention stage.

A minimum cut over tensor bytes at the compiled sequence length (networkx): every value that
crosses from the pre-owner to the attention stage costs its bytes, a parameter that would be
used on the attention stage costs its bytes (it is shipped, HelixPipe's "transfer weight"),
shape-only values are free (rematerialized). At long sequences the cut ships LN1's output and
W_qkv and runs the QKV projection on the attention stage (the reference's
``--transfer-weight``); at short sequences it ships q, k, v.
Ops moved to the attention stage get ``node.meta[meta.ROLE] = "attn"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import sympy
import torch
import torch.fx as fx

from ..ir import meta
from ..ir.segment import B, S
from ..kernels import attention as _attention_op  # noqa: F401  (registers helix::attention)
from . import PassResult

HELIX_ATTENTION = torch.ops.helix.attention.default
INF = float("inf")


@dataclass(frozen=True)
class LayerCut:
    layer: int
    moved: tuple[str, ...]  # names of the pre-attention nodes now on the attention stage
    crossing: tuple[str, ...]  # values sent pre-owner -> attention stage (the "A-bundle" minus residual)
    bytes: int  # their bytes at the compiled sizes
    shipped_params: tuple[str, ...]


def value_bytes(node: fx.Node, to_expr) -> sympy.Expr:
    """Bytes of a node's output as an expression in B and S (0 for non-tensors)."""
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    total = sympy.Integer(0)
    for v in vals:
        if isinstance(v, torch.Tensor):
            n = sympy.Integer(1)
            for d in v.shape:
                n = n * to_expr(d)
            total += n * v.element_size()
    return total


def cut_attention(gm: fx.GraphModule, *, to_expr, seq_len: int, micro_batch_size: int = 1) -> tuple[PassResult, list[LayerCut]]:
    env = {B: micro_batch_size, S: seq_len}
    cuts: list[LayerCut] = []
    attentions = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == HELIX_ATTENTION]
    for attn in attentions:
        layer = attn.meta[meta.LAYER]
        pre = [n for n in gm.graph.nodes if n.meta.get(meta.LAYER) == layer and n.meta.get(meta.ROLE) == "pre"]
        cuts.append(_cut_layer(attn, layer, pre, to_expr, env))
    return PassResult(gm, True, {"cuts": cuts}), cuts


def _cut_layer(attn: fx.Node, layer: int, pre: list[fx.Node], to_expr, env) -> LayerCut:
    g = nx.DiGraph()
    pre = [n for n in pre if n.op == "call_function"]  # parameters stay with their owner
    movable = set(pre)
    cost: dict[fx.Node, int] = {}

    def node_cost(n: fx.Node) -> float:
        if n.meta.get(meta.REMAT):
            return 0
        if isinstance(n.meta.get("val"), (list, tuple)):
            return INF  # a tuple (split) is not sendable: cut after its getitems instead
        if n not in cost:
            cost[n] = int(value_bytes(n, to_expr).subs(env))
        return cost[n]

    g.add_edge(("in", attn), "T", capacity=INF)
    for n in list(movable) + [attn]:
        g.add_edge(("in", n), ("out", n), capacity=INF if n is attn else node_cost(n))
        for a in n.all_input_nodes:
            if a not in movable:  # produced on the pre-owner (previous chunk, parameters, inputs)
                g.add_edge("S", ("in", a), capacity=INF)
                g.add_edge(("in", a), ("out", a), capacity=node_cost(a))
            g.add_edge(("out", a), ("in", n), capacity=INF)
    _, (source_side, _) = nx.minimum_cut(g, "S", "T")
    moved = [n for n in pre if ("in", n) not in source_side]
    on_sink = set(moved) | {attn}
    crossing = sorted({a for n in on_sink for a in n.all_input_nodes
                       if a not in on_sink and not a.meta.get(meta.REMAT)}, key=lambda n: n.name)
    for n in moved:
        n.meta[meta.ROLE] = "attn"
    return LayerCut(
        layer=layer, moved=tuple(n.name for n in moved), crossing=tuple(n.name for n in crossing),
        bytes=sum(node_cost(n) for n in crossing),
        shipped_params=tuple(n.target for n in crossing if n.op == "get_attr"))
