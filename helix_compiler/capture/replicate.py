"""Capture a deep model by exporting three of its layers and replicating the last one.

``torch.export`` costs about 0.4 s per layer here, whatever the width, so a 32-layer model
takes 13 s. Transformer blocks are copies of one another: export the model with its layer
ModuleList cut to three blocks, check that blocks 1 and 2 traced to the same ops, and copy
block 2's nodes for blocks 3..L-1 (renaming parameters and module paths). Used only when
every block has the same class and parameter shapes, a Hugging Face config (if any) gives
all layers the same type, and ``uniform.prove_uniform`` shows that every block runs as
block 2 (state, calls, and the recorded ops of blocks whose index their forward may read);
otherwise every layer is exported. ``CapturedGraph.layer_replication`` says which path was
taken and why; ``capture(..., replicate_layers=False)`` turns it off.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.fx as fx

log = logging.getLogger(__name__)

TRACED_LAYERS = 3  # blocks 0 and 1 show how a block reads its predecessor; 2 checks block 1


def find_uniform_layers(module: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The longest nn.ModuleList of structurally identical blocks, if it is worth replicating."""
    best = None
    for name, child in module.named_modules():
        if not isinstance(child, torch.nn.ModuleList) or len(child) <= TRACED_LAYERS:
            continue
        first = child[0]
        sig = [(n, p.shape, p.dtype) for n, p in first.named_parameters()]
        if all(type(b) is type(first) and [(n, p.shape, p.dtype) for n, p in b.named_parameters()] == sig
               for b in child) and (best is None or len(child) > len(best[1])):
            best = (name, child)
    if best is None:
        return None
    for m in module.modules():
        cfg = getattr(m, "config", None)
        types = getattr(cfg, "layer_types", None)
        if types is not None and len(set(types)) > 1:
            return None  # e.g. sliding-window layers mixed with full attention
    return best


@contextlib.contextmanager
def truncated(layers: torch.nn.ModuleList, keep: int):
    saved = dict(layers._modules)
    layers._modules = {k: v for i, (k, v) in enumerate(saved.items()) if i < keep}
    try:
        yield
    finally:
        layers._modules = saved


def _stack_fqns(node: fx.Node) -> list[str]:
    return [fqn for fqn, _ in node.meta.get("nn_module_stack", {}).values()]


def _layer_nodes(gm: fx.GraphModule, prefix: str, index: int) -> list[fx.Node]:
    path = f"{prefix}.{index}"
    out = []
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            if n.target.startswith(path + "."):
                out.append(n)
        elif n.op == "call_function" and any(f == path or f.startswith(path + ".") for f in _stack_fqns(n)):
            out.append(n)
    return out


def _signature(nodes: list[fx.Node], prefix: str, index: int) -> list:
    pos = {n: i for i, n in enumerate(nodes)}
    sig = []
    for n in nodes:
        args = fx.map_arg((n.args, n.kwargs), lambda a: ("node", pos.get(a, "outside")))
        target = n.target.replace(f"{prefix}.{index}.", "") if n.op == "get_attr" else n.target
        sig.append((n.op, str(target), str(args)))
    return sig


def replicate_layers(gm: fx.GraphModule, root: torch.nn.Module, prefix: str, num_layers: int) -> fx.GraphModule | None:
    """``gm`` was exported with blocks 0..2 of ``prefix``; return the graph with all
    ``num_layers`` blocks (parameters resolved in ``root``), or None if blocks 1 and 2 differ."""
    l1, l2 = _layer_nodes(gm, prefix, 1), _layer_nodes(gm, prefix, 2)
    if not l1 or _signature(l1, prefix, 1) != _signature(l2, prefix, 2):
        log.info("layers 1 and 2 of %s traced differently: exporting every layer", prefix)
        return None
    corr = dict(zip(l1, l2, strict=True))  # block-1 node -> block-2 node (block 2 reads block 1 as 1 reads 0)
    last_l2 = l2[-1]
    in_l2 = set(l2)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    copies: list[dict[fx.Node, fx.Node]] = []  # per extra block k = 3..L-1: block-2 node -> copy

    block2 = f"{prefix}.2"

    def rename(text: str, k: int) -> str:
        if text == block2 or text.startswith(block2 + "."):
            return f"{prefix}.{k}{text[len(block2):]}"
        return text

    def copy_block(k: int, prev: dict[fx.Node, fx.Node] | None) -> dict[fx.Node, fx.Node]:
        mine: dict[fx.Node, fx.Node] = {}

        def arg(a: fx.Node) -> fx.Node:
            if a in in_l2:
                return mine[a]
            if a in corr:  # produced by block 1: take the previous copy's block-2 counterpart
                return prev[corr[a]] if prev is not None else env[corr[a]]
            return env[a]

        for n in l2:
            if n.op == "get_attr":
                new = graph.get_attr(rename(n.target, k))
            else:
                new = graph.node_copy(n, arg)
            new.meta = dict(n.meta)
            if "nn_module_stack" in n.meta:
                new.meta["nn_module_stack"] = {key: (rename(fqn, k), cls) for key, (fqn, cls) in n.meta["nn_module_stack"].items()}
            mine[n] = new
        return mine

    for n in gm.graph.nodes:
        if n.op == "output":
            break
        env[n] = graph.node_copy(n, lambda a: _latest(a, env, copies, in_l2))
        if n is last_l2:
            prev = None
            for k in range(TRACED_LAYERS, num_layers):
                copies.append(copy_block(k, prev))
                prev = copies[-1]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    graph.output(fx.map_arg(out.args[0], lambda a: _latest(a, env, copies, in_l2)))
    graph.eliminate_dead_code()
    attrs = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            attrs[node.target] = _resolve(root, node.target)
    graph._codegen = gm.graph._codegen  # export's pytree calling convention (reads _in_spec)
    new_gm = fx.GraphModule(attrs, graph, class_name=type(gm).__name__)
    for k in ("_in_spec", "_out_spec"):
        if hasattr(gm, k):
            setattr(new_gm, k, getattr(gm, k))
    new_gm.graph.lint()
    new_gm.recompile()
    return new_gm


def _latest(a: fx.Node, env, copies, in_l2) -> fx.Node:
    """After the copies exist, a use of a block-2 value means the last block's value."""
    if copies and a in in_l2:
        return copies[-1][a]
    return env[a]


def _resolve(root: torch.nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
