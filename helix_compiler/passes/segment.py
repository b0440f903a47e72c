"""Pass: split the tagged graph into the segment chain E, A1, P1, ..., AL, PL, H.

Each segment becomes a standalone GraphModule with explicit inputs and outputs. Values a
later segment needs travel through every segment in between (the residual passes through
the attention stage, as in the reference). Shape-only nodes are copied into every segment
that needs them; model inputs are read locally by every segment that needs them (every rank
is handed the batch); parameters are local to the segments that use them, except on
attention segments, which receive them from their chain predecessor (shipped weights).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import UnsupportedModelError
from ..ir import meta
from ..ir.program import Segment
from ..ir.segment import chain_specs
from .data_independence import parameter_names


def _segment_index(node: fx.Node, num_layers: int) -> int | None:
    role, layer = node.meta.get(meta.ROLE), node.meta.get(meta.LAYER)
    if role == "embed":
        return 0
    if role == "pre":
        return 0 if layer == 1 else 2 * (layer - 1)  # E, or P(layer-1)
    if role == "attn":
        return 2 * layer - 1
    if role == "post":
        return 2 * layer
    if role == "final":
        return 2 * num_layers
    if role == "head":
        return 2 * num_layers + 1
    return None


def build_segments(gm: fx.GraphModule, *, num_layers: int, to_expr) -> list[Segment]:
    specs = chain_specs(num_layers)
    n_seg = len(specs)
    params = parameter_names(gm)
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    output_node = next(n for n in graph.nodes if n.op == "output")
    (loss,) = output_node.args[0] if isinstance(output_node.args[0], (list, tuple)) else (output_node.args[0],)

    home: dict[fx.Node, int] = {}
    for n in graph.nodes:
        if n.op == "call_function" and not n.meta.get(meta.REMAT):
            idx = _segment_index(n, num_layers)
            if idx is None:
                raise UnsupportedModelError(f"node {n.format_node()} got no segment (role {n.meta.get(meta.ROLE)})")
            home[n] = idx
    # parameters: homed at their first user's segment, or its chain predecessor for attention
    for n in graph.nodes:
        if n.op == "get_attr" and n.target in params and n.users:
            first = min((home[u] for u in n.users if u in home), default=None)
            if first is not None:
                home[n] = first - 1 if specs[first].kind == "attn" else first

    # where each value is needed
    needed_in: dict[int, set[fx.Node]] = {i: set() for i in range(n_seg)}
    for n, idx in home.items():
        if n.op == "call_function":
            needed_in[idx].add(n)
    live: list[set[fx.Node]] = [set() for _ in range(n_seg - 1)]  # boundary i -> i+1
    for n in graph.nodes:
        if n not in home:
            continue
        for u in n.users:
            if u.op == "output" or u not in home:
                continue
            k = home[u]
            if n.op == "get_attr" and specs[k].kind != "attn":
                continue  # local copy of the parameter
            for b in range(home[n], k):
                live[b].add(n)
            if k < home[n]:
                raise UnsupportedModelError(f"{u.format_node()} in segment {specs[k].name} uses {n.name} "
                                            f"from the later segment {specs[home[n]].name}")

    segments = []
    for i, spec in enumerate(specs):
        chain_in = sorted(live[i - 1], key=order.get) if i > 0 else []
        chain_out = sorted(live[i], key=order.get) if i < n_seg - 1 else [loss]
        if i == n_seg - 1 and home.get(loss) != i:
            raise UnsupportedModelError(f"the loss {loss.format_node()} is not computed in the head segment")
        own = [n for n in graph.nodes if home.get(n) == i and n.op == "call_function"]
        segments.append(_make_segment(gm, spec, own, chain_in, chain_out, params, to_expr))
    return segments


def _make_segment(gm, spec, own, chain_in, chain_out, params, to_expr) -> Segment:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in chain_in:
        p = g.placeholder(n.name if n.op != "get_attr" else n.target.replace(".", "_"))
        p.meta.update(n.meta)
        env[n] = p
    # everything the segment's own nodes need that is not a chain input
    need: set[fx.Node] = {n for n in chain_out if n.op == "get_attr" and n not in env}  # weights it ships
    stack = list(own)
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a in env or a in need:
                continue
            if a.op in ("placeholder", "get_attr") or a.meta.get(meta.REMAT):
                need.add(a)
                stack.append(a)
            elif a not in own:
                raise AssertionError(f"{spec.name}: {a.name} needed by {n.name} is neither local nor a chain input")
    user_inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n in need]
    for n in user_inputs:
        p = g.placeholder(n.name)
        p.meta.update(n.meta)
        env[n] = p
    own_set = set(own)
    for n in gm.graph.nodes:
        if n in env or not (n in own_set or n in need):
            continue
        env[n] = g.node_copy(n, lambda a: env[a])
    out = [env[n] for n in chain_out]
    g.output(tuple(out))
    seg_gm = fx.GraphModule(gm, g, class_name=f"Segment_{spec.name}")
    seg_gm.graph.lint()

    def meta_of(n):
        v = n.meta["val"]
        return tuple(to_expr(d) for d in v.shape), v.dtype
    local_params = sorted(n.target for n in need if n.op == "get_attr" and n.target in params)
    return Segment(
        spec=spec, gm=seg_gm, chain_inputs=[n.name for n in chain_in], user_inputs=[n.name for n in user_inputs],
        chain_outputs=[n.name for n in chain_out], params=local_params,
        shipped_params=[n.target for n in chain_in if n.op == "get_attr"],
        input_meta=[meta_of(n) for n in chain_in], output_meta=[meta_of(n) for n in chain_out])


def run_chain(segments: list[Segment], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run every segment in chain order in this process (the unpartitioned reference path)."""
    carried: tuple = ()
    for seg in segments:
        carried = seg.gm(*carried, *(inputs[name] for name in seg.user_inputs))
    (loss,) = carried
    return loss
