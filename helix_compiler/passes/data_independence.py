"""Analysis: which nodes depend only on shapes and constants, not on input or parameter data.

Such nodes (position ids, RoPE cos/sin tables, causal masks) are cheap to recompute from the
compiled (batch, seq) sizes, so they are rematerialized on every stage that needs them
instead of being sent, and masks among them can be evaluated at probe sizes.
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

# Ops whose result depends on their tensor argument's metadata only (shape, dtype, device).
METADATA_ONLY = {
    aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
    aten.new_ones.default, aten.new_zeros.default, aten.new_full.default, aten.new_empty.default,
    aten.ones_like.default, aten.zeros_like.default, aten.full_like.default, aten.empty_like.default,
}


def parameter_names(gm: fx.GraphModule) -> set[str]:
    # remove_duplicate=False: a tied weight is reachable under every name it has (HF's lm_head)
    return {name for name, _ in gm.named_parameters(remove_duplicate=False)}


def find_data_independent(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose values are a function of the input shapes, buffers and constants only."""
    params = parameter_names(gm)
    independent: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or node.op == "output":
            continue
        if node.op == "get_attr":
            if node.target not in params:
                independent.add(node)
            continue
        if node.op != "call_function":
            continue
        if node.target in METADATA_ONLY:
            independent.add(node)
            continue
        if all(arg in independent for arg in node.all_input_nodes):
            independent.add(node)
    return independent


TOKEN_INPUTS = ("input_ids", "labels")  # the per-token data; every other user input is batch metadata


def find_batch_derived(gm: fx.GraphModule, independent: set[fx.Node] | None = None) -> set[fx.Node]:
    """Nodes computed from shapes, buffers, constants and the *metadata* inputs only
    (``position_ids``, ``attention_mask``, document ids: any user input but the token ids and
    labels). Every rank is handed the whole batch, so these are as cheap to recompute on each
    stage as the shape-only ones (RoPE tables from ``position_ids``, document ids), and masks
    among them can be evaluated on probe batches."""
    if independent is None:
        independent = find_data_independent(gm)
    derived: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.name not in TOKEN_INPUTS and node is not _first_placeholder(gm):
                derived.add(node)
            continue
        if node.op != "call_function" or node in independent:
            continue
        inputs = node.all_input_nodes
        if any(a in derived for a in inputs) and all(a in derived or a in independent for a in inputs):
            derived.add(node)
    return {n for n in derived if n.op != "placeholder"}


def _first_placeholder(gm: fx.GraphModule) -> fx.Node | None:
    return next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
