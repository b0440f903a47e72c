"""The pipeline module's state as torch's tools expect it.

``register_owned`` makes the rank's owned parameters (and the buffers its segments read)
real attributes of the ``HelixPipeline`` under the user's names: ``pipe.layers[0].q_proj``
style paths of plain holder modules. ``nn.Module``'s own ``named_parameters``,
``state_dict``, ``to`` and ``load_state_dict`` then work unchanged, and so do the tools that
walk module attributes by name (``torch.distributed.checkpoint.state_dict.get_state_dict``,
DCP, optimizers, schedulers). The segment graphs hold the same tensor objects;
``rebind_owned`` re-points them after anything replaces a tensor (``to()`` of a buffer,
``to_empty``, ``load_state_dict(assign=True)``).

``load_owned_state_dict`` accepts this rank's entries or a whole model's state dict: keys
that belong to other ranks are ignored, keys of no rank are unexpected, a missing owned key
is an error that names it; under tensor parallelism a whole split parameter is sliced to
this tp rank's piece.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import HelixError


class StateHolder(torch.nn.Module):
    """A node of the user's module path (``layers``, ``layers.0``, ...) that holds tensors."""

    def forward(self, *args, **kwargs):
        raise HelixError("a HelixPipeline state holder is not callable; call the pipeline itself")


def _holder(pipe: torch.nn.Module, path: str) -> torch.nn.Module:
    cur = pipe
    for atom in path.split(".") if path else ():
        nxt = cur._modules.get(atom)
        if nxt is None:
            try:
                cur.add_module(atom, StateHolder())
            except KeyError as e:
                raise HelixError(f"the model's state name {path!r} collides with the HelixPipeline attribute "
                                 f"{atom!r}; rename that module of the model") from e
            nxt = cur._modules[atom]
        cur = nxt
    return cur


def register_owned(pipe: torch.nn.Module, stage) -> None:
    """Register ``stage.params`` and ``stage.owned_state.buffers`` on ``pipe`` under their
    names and remember where the segment graphs read each of them."""
    state = stage.owned_state
    for name, p in stage.params.items():
        path, _, leaf = name.rpartition(".")
        _holder(pipe, path).register_parameter(leaf, p)
    for name, b in state.buffers.items():
        path, _, leaf = name.rpartition(".")
        _holder(pipe, path).register_buffer(leaf, b, persistent=name not in state.non_persistent)
    by_id = {id(t): n for n, t in [*stage.params.items(), *state.buffers.items()]}
    bindings = []
    for seg in stage.segments.values():
        for gm in {id(seg.gm): seg.gm, id(seg.eval_gm): seg.eval_gm}.values():
            for node in gm.graph.nodes:
                if node.op == "get_attr":
                    path, _, leaf = node.target.rpartition(".")
                    owner = gm.get_submodule(path) if path else gm
                    name = by_id.get(id(getattr(owner, leaf, None)))
                    if name is not None:
                        bindings.append((owner, leaf, name))
    pipe._owned_bindings = bindings


def owned_tensors(pipe: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The pipeline's parameters and buffers by name, as its module tree holds them now."""
    out = dict(pipe.named_parameters())
    out.update(pipe.named_buffers())
    return out


def rebind_owned(pipe: torch.nn.Module) -> None:
    """Point the segment graphs, the stage program's parameter table and the pipeline's at
    the tensors the module tree holds now."""
    now = owned_tensors(pipe)
    # dp_shard: the module tree holds the dp shards, the graphs read the full parameters
    now.update(getattr(pipe, "_graph_params", {}))
    for owner, leaf, name in getattr(pipe, "_owned_bindings", ()):
        t = now[name]
        if leaf in owner._parameters:
            owner._parameters[leaf] = t
        elif leaf in owner._buffers:
            owner._buffers[leaf] = t
        else:
            setattr(owner, leaf, t)
    params = {n: now[n] for n, _ in pipe.named_parameters()}
    # the stage's table is shared with the gradient reducer: update it in place
    pipe.stage.params.update(params)
    pipe._params.update(params)


def tp_local(stage, name: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` as this tp rank holds ``name``: a whole tensor of a split parameter is sliced
    to the rank's piece; anything else is returned as it is (``load_state_dict`` then names a
    shape that fits neither)."""
    shard = stage.tp_shards.get(name)
    if shard is None or not isinstance(value, torch.Tensor) or name not in stage.params:
        return value
    local = stage.params[name]
    if tuple(value.shape) == shard.full_shape(local.shape, stage.tp_size) != tuple(local.shape):
        return shard.local(value, stage.tp_rank, stage.tp_size)
    return value


def load_owned_state_dict(pipe: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True,
                          assign: bool = False):
    """``nn.Module.load_state_dict`` over this rank's keys of ``state_dict`` (a whole model's
    or this rank's own), by the user's names (a tied tensor under any of its names)."""
    state = pipe.stage.owned_state
    own = set(pipe.state_dict(keep_vars=True))
    mine: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state_dict.items():
        name = state.aliases.get(key, key)
        if name in own:
            mine.setdefault(name, tp_local(pipe.stage, name, value))
        elif key not in state.model_keys:
            unexpected.append(key)
    missing = sorted(own - set(mine))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing this rank's key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}, which belong "
                         f"to no rank of the model")
        raise HelixError(f"rank {pipe.rank}: load_state_dict: {'; '.join(parts)}. Pass a state dict of the whole "
                         f"model or of this rank (names as in model.state_dict()), or strict=False")
    result = torch.nn.Module.load_state_dict(pipe, mine, strict=False, assign=assign)
    if assign:
        rebind_owned(pipe)
    return torch.nn.modules.module._IncompatibleKeys(missing, unexpected) if not strict else result
