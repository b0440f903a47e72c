"""``load_pretrained``: a rank reads only its own tensors from a Hugging Face safetensors
checkpoint directory (``model.safetensors``, or shards listed in
``model.safetensors.index.json``), through safetensors' lazy ``safe_open`` access: the
files are memory-mapped and only the owned tensors' bytes are read (under tensor
parallelism only this tp rank's piece of a split parameter)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from .errors import HelixError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def checkpoint_files(path: str | os.PathLike) -> dict[str, str]:
    """``tensor name -> file`` of the safetensors checkpoint at ``path`` (a directory, or one
    ``.safetensors`` file)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isfile(path):
        files = [path]
    elif os.path.isfile(os.path.join(path, INDEX)):
        with open(os.path.join(path, INDEX)) as f:
            weight_map: Mapping[str, str] = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    elif os.path.isfile(os.path.join(path, SINGLE)):
        files = [os.path.join(path, SINGLE)]
    else:
        raise HelixError(f"load_pretrained: {path!r} has neither {INDEX} nor {SINGLE}; pass a Hugging Face "
                         f"checkpoint directory (save_pretrained(..., safe_serialization=True)) or a .safetensors file")
    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), file))
    return out


def load_pretrained(pipe, path: str | os.PathLike, *, strict: bool = True):
    """Load this rank's parameters and persistent buffers of ``pipe`` (a ``HelixPipeline``)
    from the safetensors checkpoint at ``path``, reading only those tensors; a tied tensor is
    found under any of its names. Returns what ``pipe.load_state_dict`` returns."""
    from safetensors import safe_open

    where = checkpoint_files(path)
    aliases = pipe.stage.owned_state.aliases
    names_of: dict[str, list[str]] = {}
    for alias, first in aliases.items():
        names_of.setdefault(first, []).append(alias)
    wanted = list(pipe.state_dict(keep_vars=True))
    device = next((t.device for t in pipe.state_dict(keep_vars=True).values()), torch.device("cpu"))
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name in wanted:
        key = next((k for k in (name, *names_of.get(name, ())) if k in where), None)
        if key is not None:
            by_file.setdefault(where[key], []).append((name, key))
    stage = pipe.stage
    state: dict[str, torch.Tensor] = {}
    for file, pairs in by_file.items():
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name, key in pairs:
                shard = stage.tp_shards.get(name)
                state[name] = f.get_tensor(key) if shard is None else _read_piece(f, key, shard, stage)
    return pipe.load_state_dict(state, strict=strict)


def _read_piece(f, key: str, shard, stage) -> torch.Tensor:
    """This tp rank's piece of tensor ``key`` of split parameter: only its rows (columns) are read."""
    sl = f.get_slice(key)
    size = sl.get_shape()[shard.dim]
    parts = [sl[(slice(None),) * shard.dim + (slice(start, start + n),)]
             for start, n in shard.ranges(size, stage.tp_rank, stage.tp_size)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, shard.dim)
