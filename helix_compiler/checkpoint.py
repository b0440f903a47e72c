"""Training checkpoints of a pipeline with torch's own tools: ``torch.distributed.checkpoint``
(DCP) over ``get_state_dict`` / ``set_state_dict``.

Every tensor is saved under the user's name (``model.<fqn>``, ``optim.state.<fqn>.exp_avg``,
...), whole, by the rank that owns it (a weight held by several ranks is saved once; a
tensor-parallel parameter and its optimizer state are put back together over tp and saved
by tp rank 0), so a checkpoint saved at one pipeline, tp or dp size loads at any other,
and into the plain model in one process (``load_model_state``). ``save_checkpoint`` adds what an exact resume needs: the LR
scheduler's state, the training step (the data position) and every rank's RNG states (the
CPU generator and, on CUDA, the device's), which dropout draws from; those are restored only
on a resume at the same world size (RNG streams do not reshard).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import HelixError


def _dcp():
    import functools

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    # optimizer state and param-group entries keyed by parameter name: what lets a checkpoint
    # load at another pipeline size (torchtitan saves it the same way)
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    return (dcp, functools.partial(get_state_dict, options=options),
            functools.partial(set_state_dict, options=options))


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rng_state(device: torch.device | None) -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def save_checkpoint(path: str | os.PathLike, pipe: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, scheduler: Any = None, step: int = 0) -> None:
    """Save model, optimizer, scheduler, ``step`` and this rank's RNG states to the DCP
    directory ``path``. A collective: every rank of the default group calls it."""
    dcp, get_state_dict, _ = _dcp()
    rank, world = _rank_and_world()
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(pipe, optimizer)
    else:
        model_sd, optim_sd = get_state_dict(pipe, [])
    for d, key, shard in _tp_split_entries(pipe, model_sd, optim_sd):  # saved whole, by tp rank 0
        piece = d[key].full_tensor() if _is_dtensor(d[key]) else d[key]  # dp_shard: this tp rank's piece first
        whole = shard.unshard(pipe.tp_transport.all_gather_(piece.detach().contiguous(), what=f"checkpoint {key}"))
        if pipe.stage.tp_rank == 0:
            d[key] = whole
        else:
            del d[key]
    device = next((p.device for p in pipe.parameters()), None)
    state: dict[str, Any] = {"model": model_sd, "step": torch.tensor(int(step)),
                             "world_size": torch.tensor(world),
                             f"rng_rank{rank}": _rng_state(device)}
    if optimizer is not None:
        state["optim"] = optim_sd
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    dcp.save(state, checkpoint_id=os.fspath(path))


def load_checkpoint(path: str | os.PathLike, pipe: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, scheduler: Any = None, restore_rng: bool = True) -> int:
    """Load what ``save_checkpoint`` saved into ``pipe`` (any pipeline size), ``optimizer``
    and ``scheduler``; restore this rank's RNG states when the checkpoint was saved at this
    world size (``restore_rng``). Returns the saved step. A collective."""
    dcp, get_state_dict, set_state_dict = _dcp()
    rank, world = _rank_and_world()
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(pipe, optimizer)
    else:
        model_sd, optim_sd = get_state_dict(pipe, [])
    split = _tp_split_entries(pipe, model_sd, optim_sd)
    sharded_over_dp = set()
    for d, key, shard in split:  # read whole, keep this tp rank's piece
        if _is_dtensor(d[key]):
            sharded_over_dp.add(key)
        local = d[key].to_local() if _is_dtensor(d[key]) else d[key]
        d[key] = torch.empty(shard.full_shape(d[key].shape, pipe.tp_size), dtype=d[key].dtype, device=local.device)
    state: dict[str, Any] = {"model": model_sd, "step": torch.tensor(0), "world_size": torch.tensor(0)}
    if optimizer is not None:
        state["optim"] = optim_sd
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    dcp.load(state, checkpoint_id=os.fspath(path))
    for d, key, shard in split:
        piece = shard.local(d[key], pipe.stage.tp_rank, pipe.tp_size).clone()
        d[key] = pipe.sharder.shard_of(piece) if key in sharded_over_dp else piece
    saved_world = int(state["world_size"])
    if restore_rng and saved_world == world:
        device = next((p.device for p in pipe.parameters()), None)
        rng = {k: v.clone() for k, v in _rng_state(device).items()}
        got = {f"rng_rank{rank}": rng}
        dcp.load(got, checkpoint_id=os.fspath(path))
        torch.set_rng_state(got[f"rng_rank{rank}"]["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(got[f"rng_rank{rank}"]["cuda"], device)
    if optimizer is not None:
        set_state_dict(pipe, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_state_dict(pipe, [], model_state_dict=state["model"], optim_state_dict={})
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _tp_split_entries(pipe, model_sd: dict, optim_sd: dict) -> list[tuple[dict, str, Any]]:
    """``(dict, key, Sharded)`` of every entry that holds this tp rank's piece of a split
    parameter: the parameter itself and its optimizer state of the same shape. They are
    checkpointed whole, so that a checkpoint loads at any tp size (and pp, dp, one process);
    under dp_shard they are DTensors over dp whose global shape is the tp piece's."""
    stage = pipe.stage
    if stage.tp_size <= 1:
        return []
    out = [(model_sd, k, stage.tp_shards[k]) for k in model_sd if k in stage.tp_shards]
    for fqn, shard in stage.tp_shards.items():
        prefix, shape = f"state.{fqn}.", tuple(stage.params[fqn].shape)
        out += [(optim_sd, k, shard) for k, v in optim_sd.items()
                if k.startswith(prefix) and "." not in k[len(prefix):] and isinstance(v, torch.Tensor)
                and tuple(v.shape) == shape]
    return out


def load_model_state(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load the model part of a pipeline checkpoint into the plain ``model`` (in one process,
    no process group needed): the resharding to a single process."""
    dcp, _, _ = _dcp()
    seen: set[int] = set()
    mine = {}
    for k, v in model.state_dict().items():  # a tied tensor once, under its first name (as saved)
        if v.is_meta:
            raise HelixError(f"load_model_state: {k} is on the meta device; build the model on a real device "
                             f"(or init_model(model)) before loading into it")
        if v.untyped_storage().data_ptr() not in seen or v.numel() == 0:
            seen.add(v.untyped_storage().data_ptr())
            mine[k] = v
    dcp.load({"model": mine}, checkpoint_id=os.fspath(path))  # in place: the views share the model's storage
