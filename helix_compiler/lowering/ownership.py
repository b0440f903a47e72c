"""Lowering: what of the model's state a rank holds besides its parameters
(:class:`~helix_compiler.ir.owned_state.OwnedState`), by the user's names."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx as fx

from ..ir.owned_state import OwnedState


def get_attr_tensors(gm: fx.GraphModule):
    """``(owner module, attribute name, tensor)`` of every ``get_attr`` node of ``gm``."""
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        path, _, leaf = n.target.rpartition(".")
        owner = gm.get_submodule(path) if path else gm
        t = getattr(owner, leaf)
        if isinstance(t, torch.Tensor):
            yield owner, leaf, t


def owned_state(program, segments: Mapping) -> OwnedState:
    """The buffers the rank's ``segments`` read, the other names of tied tensors and the full
    model's state-dict keys, from the captured (adapted) module."""
    module, fqn = program.captured.module, program.captured.user_fqn
    names: dict[int, str] = {}
    aliases: dict[str, str] = {}
    non_persistent: set[str] = set()
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        tensors = [*mod._parameters.items(), *mod._buffers.items()]
        for leaf, t in tensors:
            if t is None:
                continue
            name = fqn(f"{mod_name}.{leaf}" if mod_name else leaf)
            first = names.setdefault(id(t), name)
            if first != name:
                aliases[name] = first
            if leaf in mod._buffers and leaf in mod._non_persistent_buffers_set:
                non_persistent.add(name)
    buffers: dict[str, torch.Tensor] = {}
    params = {id(p) for p in module.parameters()}
    for seg in segments.values():
        for _, _, t in get_attr_tensors(seg.gm):
            if id(t) not in params and id(t) in names:
                buffers[names[id(t)]] = t
    keys = frozenset(fqn(k) for k in module.state_dict(keep_vars=True))
    return OwnedState(buffers=buffers, non_persistent=frozenset(n for n in non_persistent if n in buffers),
                      aliases=aliases, model_keys=keys)
