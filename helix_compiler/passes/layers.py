"""Analysis + tagging: find the layers and give every node its HelixPipe role.

Layers are the children of the ModuleList that holds the attentions (found from
``nn_module_stack``). Roles (``node.meta[meta.ROLE]``): ``embed`` (before layer 1),
``pre`` / ``attn`` / ``post`` of layer l (``pre`` = the layer's ancestors of its attention),
``final`` (after the last layer, up to the head's activation input, e.g. the final norm),
``head`` (logits and loss). Nodes computed from shapes and the batch's metadata inputs only
(position ids, RoPE tables, document ids; ``find_batch_derived``) get
``node.meta[meta.REMAT] = True`` and are recomputed wherever they are used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import UnsupportedModelError
from ..ir import meta
from ..kernels import attention as _attention_op  # noqa: F401  (registers helix::attention)
from . import PassResult
from .data_independence import find_batch_derived, find_data_independent, parameter_names

aten = torch.ops.aten
HELIX_ATTENTION = torch.ops.helix.attention.default
MATMULS = {aten.linear.default, aten.matmul.default, aten.mm.default, aten.addmm.default, aten.bmm.default}
_INDEXED = re.compile(r"^(.*)\.(\d+)$")


@dataclass
class LayerInfo:
    num_layers: int
    layer_fqns: list[str]  # module FQN of each layer, in execution order
    attention_nodes: list[fx.Node]
    head_matmul: fx.Node
    roles: dict[str, int] = field(default_factory=dict)  # role -> node count


def _module_fqns(node: fx.Node) -> list[str]:
    return [fqn for fqn, _ in node.meta.get("nn_module_stack", {}).values()]


def _layer_container(attentions: list[fx.Node]) -> tuple[str, list[str]]:
    """The ModuleList prefix whose distinct children hold the attentions."""
    candidates: dict[str, list[str]] | None = None
    for node in attentions:
        found: dict[str, str] = {}
        for fqn in _module_fqns(node):
            parts = fqn.split(".")
            for i in range(1, len(parts)):
                if parts[i].isdigit():
                    found[".".join(parts[:i])] = ".".join(parts[: i + 1])
        if candidates is None:
            candidates = {p: [c] for p, c in found.items()}
        else:
            candidates = {p: cs + [found[p]] for p, cs in candidates.items() if p in found}
    for prefix, children in sorted((candidates or {}).items(), key=lambda kv: -len(kv[0])):
        if len(set(children)) == len(children):
            return prefix, children
    raise UnsupportedModelError(
        f"could not find the layers: the {len(attentions)} attentions are not in distinct children of "
        f"one nn.ModuleList (module stacks: {[_module_fqns(n)[-1:] for n in attentions]}); "
        f"keep the transformer blocks in an nn.ModuleList")


def _ancestors(nodes: list[fx.Node], stop: set[fx.Node] | None = None) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen and (stop is None or a not in stop):
                seen.add(a)
                stack.append(a)
    return seen


def tag_layers(gm: fx.GraphModule) -> tuple[PassResult, LayerInfo]:
    graph = gm.graph
    attentions = [n for n in graph.nodes if n.op == "call_function" and n.target == HELIX_ATTENTION]
    if not attentions:
        raise UnsupportedModelError(
            "no attention found in the captured graph: helix_compiler pipelines transformers whose "
            "attention is F.scaled_dot_product_attention or an explicit softmax(q @ k^T) @ v")
    _, layer_fqns = _layer_container(attentions)
    layer_of_fqn = {fqn: i + 1 for i, fqn in enumerate(layer_fqns)}
    independent = find_data_independent(gm)
    independent |= find_batch_derived(gm, independent)
    params = parameter_names(gm)

    def layer_of(node: fx.Node) -> int | None:
        for fqn in _module_fqns(node):
            if fqn in layer_of_fqn:
                return layer_of_fqn[fqn]
        if node.op == "get_attr":
            for fqn, idx in layer_of_fqn.items():
                if node.target.startswith(fqn + "."):
                    return idx
        return None

    for node in graph.nodes:
        node.meta[meta.REMAT] = node in independent
        node.meta[meta.LAYER] = None if node in independent else layer_of(node)
        node.meta[meta.ROLE] = None

    # attention, pre, post of each layer
    for layer, attn in enumerate(attentions, start=1):
        if attn.meta[meta.LAYER] != layer:
            raise UnsupportedModelError(f"attention {attn.format_node()} sits in layer {attn.meta[meta.LAYER]} "
                                        f"but is the attention number {layer}: one attention per layer is required")
        attn.meta[meta.ROLE] = "attn"
        for user in attn.users:
            user.meta[meta.ROLE] = "attn"
            user.meta[meta.LAYER] = layer
        for a in _ancestors([attn]):
            if a.meta[meta.LAYER] == layer and not a.meta[meta.REMAT]:
                a.meta[meta.ROLE] = "pre"
    for node in graph.nodes:
        if node.meta[meta.LAYER] is not None and node.meta[meta.ROLE] is None:
            if node.op == "get_attr" and all(u.meta[meta.ROLE] == "pre" for u in node.users):
                node.meta[meta.ROLE] = "pre"
            else:
                node.meta[meta.ROLE] = "post"

    # outside the layers: embedding prologue, final norm, head
    layer_nodes = [n for n in graph.nodes if n.meta[meta.LAYER] is not None]
    before_first = _ancestors([n for n in layer_nodes if n.meta[meta.LAYER] == 1])
    outside = [n for n in graph.nodes if n.meta[meta.LAYER] is None and not n.meta[meta.REMAT]
               and n.op not in ("placeholder", "output")]
    epilogue = [n for n in outside if n not in before_first]
    head_matmul = _find_head_matmul(epilogue, params)
    act = [a for a in head_matmul.all_input_nodes if not (a.op == "get_attr" or _is_param_view(a))]
    final_nodes = _ancestors(act) | set(act)
    for node in outside:
        if node in before_first:
            node.meta[meta.ROLE] = "embed"
        elif node in final_nodes:
            node.meta[meta.ROLE] = "final"
        else:
            node.meta[meta.ROLE] = "head"
    # a parameter used in several places takes the role of its first user
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in params and node.users:
            first = min(node.users, key=lambda u: _order(graph)[u])
            node.meta[meta.ROLE] = first.meta[meta.ROLE]
            node.meta[meta.LAYER] = first.meta[meta.LAYER]
    roles: dict[str, int] = {}
    for node in graph.nodes:
        r = node.meta[meta.ROLE] or ("remat" if node.meta[meta.REMAT] else node.op)
        roles[r] = roles.get(r, 0) + 1
    info = LayerInfo(len(attentions), layer_fqns, attentions, head_matmul, roles)
    return PassResult(gm, True, {"layers": len(attentions)}), info


_ORDER_CACHE: dict[int, dict[fx.Node, int]] = {}


def _order(graph: fx.Graph) -> dict[fx.Node, int]:
    key = id(graph)
    cached = _ORDER_CACHE.get(key)
    if cached is None or len(cached) != len(graph.nodes):
        cached = {n: i for i, n in enumerate(graph.nodes)}
        _ORDER_CACHE[key] = cached
    return cached


def _is_param_view(node: fx.Node) -> bool:
    """``t(weight)`` / ``permute(weight)`` of a parameter (a tied head's weight)."""
    while node.op == "call_function" and node.target in (aten.t.default, aten.transpose.int, aten.permute.default,
                                                          aten.view.default, aten.reshape.default):
        node = node.args[0]
    return node.op == "get_attr"


def _find_head_matmul(epilogue: list[fx.Node], params: set[str]) -> fx.Node:
    matmuls = [n for n in epilogue if n.op == "call_function" and n.target in MATMULS
               and any(a.op == "get_attr" or _is_param_view(a) for a in n.all_input_nodes)]
    if not matmuls:
        raise UnsupportedModelError(
            "no output head found after the last layer (a linear/matmul with a weight producing the "
            "logits); the model must compute logits and a loss after its transformer blocks")
    def numel(n):
        v = n.meta["val"]
        size = 1
        for d in v.shape:
            size = size * d
        return size
    # the logits: the widest matmul output of the epilogue (compare via a large probe substitution)
    return max(matmuls, key=lambda n: _probe_size(numel(n)))


def _probe_size(x) -> int:
    if isinstance(x, torch.SymInt):
        expr = x.node.expr
        return int(expr.subs({s: 4096 for s in expr.free_symbols}))
    return int(x)
