"""Per-rank materialization: a rank allocates only the parameters and buffers it owns.

A model built under ``torch.device("meta")`` holds no data. ``materialize_stage`` gives the
tensors one rank's stage program reads (its owned parameters, shipped weights included, and
the buffers its segments read) real storage on the rank's device, initializes them with the
model's own initialization, and rebinds them into the rank's segment graphs and the user's
model; every other tensor stays on meta and is never allocated. A model built in full is
left as it is, except that owned tensors on another device move to ``device``.

Initialization ("equals" here): the model's own init runs on each module that owns a
materialized tensor (the module of the tensor's first name): Hugging Face models through
``model._init_weights(module)`` (which also recomputes rotary ``inv_freq``), other modules
through ``module.reset_parameters()`` (torch's layers; user modules that own parameters or
buffers must define it, ``models.RMSNorm`` and ``models.Llama`` do). Each module runs under
its own seed, derived from ``seed`` and the module's name, so a tensor's initial value does
not depend on which rank holds it or on the pipeline size. A model initialized in one
process under one global RNG stream (``torch.manual_seed(0); Model(cfg)``) cannot be
reproduced by a rank that builds only a part of it (each tensor's values depend on every
draw made before it), so the single-process equal is ``init_model(model, seed=seed)``: the
same per-module seeds over the whole model. The two are bitwise equal on the same device
type. A module whose init draws for several of its own tensors, of which the rank owns only
some, would draw differently (meta tensors consume no random numbers); a module's tensors
are read by the same op (a linear's weight and bias), so they land on one rank, and a tied
weight takes its value from its first module on every rank that holds it.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from ..errors import HelixError
from ..ir.stage_program import StageProgram


def default_device(transport=None) -> torch.device:
    """The rank's device: the transport's (where receive buffers live), else the current
    CUDA device when there is one, else CPU."""
    if transport is not None and getattr(transport, "device", None) is not None:
        return torch.device(transport.device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_device(device, transport) -> torch.device:
    """``device`` (default: the rank's, ``default_device``), checked against the transport's:
    the batch, the received messages and the parameters must live on one device."""
    want = default_device(transport) if device is None else torch.device(device)
    have = getattr(transport, "device", None)
    if have is not None and want != torch.device(have):
        raise HelixError(f"device={str(want)!r} but this rank's transport computes on {str(have)!r} (its receive "
                         f"buffers and the batch live there); pass device={str(have)!r} or omit device")
    return want


def module_seed(seed: int, name: str) -> int:
    """The seed module ``name`` initializes under (independent of rank and pipeline size)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def init_model(model: torch.nn.Module, *, seed: int = 0, device: torch.device | str | None = None) -> torch.nn.Module:
    """Materialize (from meta) and initialize the whole ``model`` in this process with the
    per-module seeds a pipeline uses: the single-process equal of ``helix_compile(meta_model,
    ..., init_seed=seed)``. Every tensor is (re)initialized, also on a model built in full."""
    device = torch.device(device) if device is not None else default_device()
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    _materialize(model, names, device=device, seed=seed, reinit=True)
    return model


def materialize_rank(stages: tuple[StageProgram, ...], rank: int, model: torch.nn.Module, *,
                     device: torch.device, seed: int = 0) -> tuple[StageProgram, ...]:
    """``stages`` with ``stages[rank]`` materialized (``materialize_stage``)."""
    out = list(stages)
    out[rank] = materialize_stage(stages[rank], model, device=device, seed=seed)
    return tuple(out)


def materialize_stage(stage: StageProgram, model: torch.nn.Module, *, device: torch.device,
                      seed: int = 0) -> StageProgram:
    """The rank's tensors on ``device`` (allocated and initialized where they were meta), bound
    into its segment graphs and into ``model``; the returned program's ``params`` and
    ``owned_state.buffers`` are the new tensors.

    Under tensor parallelism a split parameter is this tp rank's piece: its module's tensors
    are materialized and initialized whole (so the piece equals the same slice of
    ``init_model``), sliced, and the whole tensor is dropped back to meta before the next
    module, so the transient cost is one module's full tensors."""
    device = torch.device(device)
    tensors = {**stage.params, **stage.owned_state.buffers}
    names = [n for n, t in tensors.items() if t.is_meta or t.device != device]
    if not names:  # built in full on this device: nothing to do (the usual small-model route)
        return stage
    split = {n for n in names if n in stage.tp_shards}
    replaced: dict[int, torch.Tensor] = {}
    by_module: dict[str, list[str]] = {}
    for n in names:  # a module's tensors together: its init draws for all of them in order
        by_module.setdefault(n.rpartition(".")[0] if n in split else "", []).append(n)
    whole = by_module.pop("", [])
    for group in by_module.values():
        group = group + [n for n in whole if n.rpartition(".")[0] == group[0].rpartition(".")[0]]
        whole = [n for n in whole if n not in group]
        done = _materialize(model, group, device=device, seed=seed, reinit=False)
        full = _tensors_by_name(model)
        dropped = set()
        for n in (n for n in group if n in split):
            old = stage.params[n]
            piece = stage.tp_shards[n].local(full[n].detach(), stage.tp_rank, stage.tp_size).clone()
            replaced[id(old)] = torch.nn.Parameter(piece, requires_grad=old.requires_grad)
            dropped.add(id(full[n]))
            _drop_to_meta(model, full[n])
        replaced.update({k: v for k, v in done.items() if id(v) not in dropped})
    if whole:
        replaced.update(_materialize(model, whole, device=device, seed=seed, reinit=False))
    for seg in stage.segments.values():
        for gm in {id(seg.gm): seg.gm, id(seg.eval_gm): seg.eval_gm}.values():
            for node in gm.graph.nodes:
                if node.op != "get_attr":
                    continue
                path, _, leaf = node.target.rpartition(".")
                owner = gm.get_submodule(path) if path else gm
                t = getattr(owner, leaf)
                if not isinstance(t, torch.Tensor):
                    continue
                new = replaced.get(id(t))
                if new is None and t.is_meta:
                    raise HelixError(
                        f"rank {stage.rank}: segment {seg.name} reads the tensor constant {node.target} "
                        f"(shape {tuple(t.shape)}), which was captured on the meta device and is not a "
                        f"parameter or buffer of the model, so its value is unknown; make it a buffer of "
                        f"a module (register_buffer) or build the model on a real device")
                if new is None and t.device != device:  # a lifted constant captured on another device
                    new = replaced[id(t)] = t.to(device)
                if new is not None:
                    _set(owner, leaf, new)
    params = {n: replaced.get(id(p), p) for n, p in stage.params.items()}
    buffers = {n: replaced.get(id(b), b) for n, b in stage.owned_state.buffers.items()}
    return dataclasses.replace(stage, params=params,
                               owned_state=dataclasses.replace(stage.owned_state, buffers=buffers))


# ------------------------------------------------------------------------------ core
def _set(owner: torch.nn.Module, leaf: str, t: torch.Tensor) -> None:
    if leaf in owner._parameters:
        owner._parameters[leaf] = t
    elif leaf in owner._buffers:
        owner._buffers[leaf] = t
    else:
        setattr(owner, leaf, t)


def _tensors_by_name(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}


def _drop_to_meta(model: torch.nn.Module, t: torch.Tensor) -> None:
    """Put ``t`` back on meta everywhere the model holds it (a split parameter's whole value,
    once its piece is taken)."""
    meta = torch.empty_like(t, device="meta")
    if isinstance(t, torch.nn.Parameter):
        meta = torch.nn.Parameter(meta, requires_grad=t.requires_grad)
    for mod in model.modules():
        for leaf, v in [*mod._parameters.items(), *mod._buffers.items()]:
            if v is t:
                _set(mod, leaf, meta)


def _materialize(model: torch.nn.Module, names, *, device: torch.device, seed: int,
                 reinit: bool) -> dict[int, torch.Tensor]:
    """Give the tensors ``names`` (user names, any alias) real storage on ``device`` in
    ``model``; initialize those that were meta (all of them with ``reinit``). Returns
    ``id(old tensor) -> new tensor`` for every tensor replaced."""
    places: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    first_module: dict[int, str] = {}
    by_name: dict[str, torch.Tensor] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for leaf, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is None:
                continue
            places.setdefault(id(t), []).append((mod, leaf))
            first_module.setdefault(id(t), mod_name)
            by_name[f"{mod_name}.{leaf}" if mod_name else leaf] = t
    missing = [n for n in names if n not in by_name]
    if missing:
        raise HelixError(f"the model has no parameter or buffer {missing[0]!r} the stage program owns; pass "
                         f"helix_compile the model it compiled")
    replaced: dict[int, torch.Tensor] = {}
    fresh: set[int] = set()  # new ids of tensors to initialize
    for name in names:
        t = by_name[name]
        if id(t) in replaced:
            continue
        if t.is_meta:
            new = torch.empty_like(t, device=device)
        elif t.device != device:
            new = t.detach().to(device)
        elif reinit:
            new = t
        else:
            continue
        if isinstance(t, torch.nn.Parameter) and not isinstance(new, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
        for mod, leaf in places[id(t)]:
            _set(mod, leaf, new)
        replaced[id(t)] = new
        if t.is_meta or reinit:
            fresh.add(id(new))
        first_module[id(new)] = first_module[id(t)]
    if fresh:
        _initialize(model, fresh, first_module, device=device, seed=seed)
    return replaced


def _init_fn(model: torch.nn.Module):
    """How the model initializes one module: Hugging Face's ``_init_weights`` or torch's
    ``reset_parameters``."""
    hf_init = getattr(model, "_init_weights", None)
    if callable(hf_init) and hasattr(model, "config"):
        return lambda mod: hf_init(mod)
    return lambda mod: mod.reset_parameters()


def _initialize(model: torch.nn.Module, fresh: set[int], first_module: dict[int, str], *,
                device: torch.device, seed: int) -> None:
    init = _init_fn(model)
    hf = callable(getattr(model, "_init_weights", None)) and hasattr(model, "config")
    modules = dict(model.named_modules())
    todo = [n for n in modules if any(first_module.get(i) == n for i in fresh)]
    devices = [device] if device.type == "cuda" else []
    for name in todo:
        mod = modules[name]
        mine = [(leaf, t) for leaf, t in [*mod._parameters.items(), *mod._buffers.items()]
                if t is not None and id(t) in fresh]
        if not hf and not callable(getattr(mod, "reset_parameters", None)):
            raise HelixError(
                f"module {name or '<root>'} ({type(mod).__name__}) owns {[leaf for leaf, _ in mine]}, which were "
                f"built on the meta device, but defines no reset_parameters() to compute them; define "
                f"reset_parameters() (set its parameters and recompute its buffers), or build the model on a "
                f"real device")
        # tensors of this module first named by another module keep that module's values
        keep = {leaf: t.detach().clone() for leaf, t in [*mod._parameters.items(), *mod._buffers.items()]
                if t is not None and not t.is_meta and first_module.get(id(t)) != name}
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"), \
                torch.no_grad():
            torch.manual_seed(module_seed(seed, name))
            init(mod)
            for leaf, value in keep.items():
                getattr(mod, leaf).copy_(value)
