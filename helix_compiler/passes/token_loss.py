"""Pass: make the head's loss a token sum, so the step's loss can be a mean over tokens.

A model's loss is the mean cross-entropy over the counted tokens of what it is given (labels
other than ``ignore_index``). Averaging the micro batches' means weights a token of a sparse
micro batch more than one of a dense one; the single-process model, run on the whole batch,
weights every counted token alike. So under ``loss_reduction="tokens"`` the head segment
returns the cross-entropy *sum* (reduction mean -> sum, the one node this pass changes), and
the runtime divides the step's sum by the step's number of counted tokens, which every rank
computes from the labels with the extracted ``count`` graph (the cross-entropy's target as the
model computes it from the labels, Hugging Face's shift included) and the ranks agree on
before the backward half. A micro batch without counted tokens then contributes 0, not 0/0.

The loss must be exactly one mean-reduced, unweighted cross-entropy (or NLL) whose target is
computed from the user inputs alone; anything else (extra loss terms, class weights) is
rejected with the node named, as a token count would not be what the model divides by.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import UnsupportedModelError
from ..ir.program import Segment
from ..ir.stage_program import TokenCount

aten = torch.ops.aten
MEAN, SUM = 1, 2  # at::Reduction
PASSTHROUGH = {aten.to.dtype, aten.type_as.default, aten.contiguous.default, aten.clone.default,
               aten.alias.default, aten._to_copy.default, aten.to.dtype_layout}
# losses with (target, weight, reduction, ignore_index) arguments
LOSSES = {aten.cross_entropy_loss.default, aten.nll_loss.default, aten.nll_loss_forward.default,
          aten.nll_loss2d.default}


def _arg(node: fx.Node, name: str):
    schema = node.target._schema.arguments
    for i, a in enumerate(schema):
        if a.name == name:
            if i < len(node.args):
                return node.args[i], i
            return node.kwargs.get(name, a.default_value), i
    raise KeyError(name)


def _loss_node(gm: fx.GraphModule) -> fx.Node:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    (loss,) = out.args[0]
    node = loss
    while node.op == "call_function" and node.target in PASSTHROUGH:
        node = node.args[0]
    if node.op == "call_function" and node.target.__name__ == "getitem" and node.args[1] == 0 \
            and node.args[0].op == "call_function" and node.args[0].target == aten.nll_loss_forward.default:
        node = node.args[0]
    if node.op != "call_function" or node.target not in LOSSES:
        raise UnsupportedModelError(
            f"loss_reduction='tokens' needs the loss to be one mean cross-entropy over the counted tokens, "
            f"but the head returns {loss.format_node()}: pass loss_reduction='micro_batch_mean' (the mean "
            f"of the micro batches' losses) for a loss with other terms")
    return node


def sum_token_loss(head: Segment) -> TokenCount:
    """Rewrite ``head``'s loss to reduction sum (in place) and return its token count."""
    gm = head.gm
    loss = _loss_node(gm)
    weight, _ = _arg(loss, "weight")
    reduction, r_pos = _arg(loss, "reduction")
    ignore_index, _ = _arg(loss, "ignore_index")
    target, _ = _arg(loss, "target")
    if weight is not None:
        raise UnsupportedModelError(f"loss_reduction='tokens': the loss {loss.format_node()} has class weights, so "
                                    f"its mean divides by their sum, not a token count; use "
                                    f"loss_reduction='micro_batch_mean'")
    if reduction != MEAN:
        raise UnsupportedModelError(f"loss_reduction='tokens': the loss {loss.format_node()} has reduction "
                                    f"{reduction} (1 = mean is needed); use loss_reduction='micro_batch_mean'")
    count = _extract(gm, target, head.user_inputs, loss)
    args = list(loss.args)
    if r_pos < len(args):
        args[r_pos] = SUM
        loss.args = tuple(args)
    else:
        loss.kwargs = {**loss.kwargs, "reduction": SUM}
    gm.recompile()
    return TokenCount(count[0], count[1], int(ignore_index))


def _extract(gm: fx.GraphModule, target: fx.Node, user_inputs, loss: fx.Node) -> tuple[fx.GraphModule, tuple]:
    """A standalone graph computing ``target`` from the segment's user inputs."""
    seen: set[fx.Node] = set()
    stack = [target]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and n.name not in user_inputs:
            raise UnsupportedModelError(f"loss_reduction='tokens': the target of {loss.format_node()} depends on "
                                        f"{n.name}, not only on the model inputs; use "
                                        f"loss_reduction='micro_batch_mean'")
        stack.extend(n.all_input_nodes)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    names = []
    for n in gm.graph.nodes:
        if n not in seen:
            continue
        if n.op == "placeholder":
            env[n] = g.placeholder(n.name)
            names.append(n.name)
        else:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[target])
    return fx.GraphModule(gm, g, class_name="TokenCount"), tuple(names)
