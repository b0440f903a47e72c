"""Parameters and gradients sharded over the data-parallel replicas (ZeRO-3 / FSDP2 with
``reshard_after_forward=False``): ``helix_compile(..., mesh=..., dp_shard=True)``.

Between steps each pipeline rank's owned parameters live only as ``Shard(0)`` DTensors on the
1-D dp ``DeviceMesh`` (``torch.chunk`` rows: uneven dim 0 is fine, the last ranks may hold
fewer rows or none). Those shards are what ``pipe.parameters()``, ``named_parameters()`` and
``state_dict()`` return, under the user's names, so an optimizer keeps and steps ``1/dp`` of
the state, and DCP sees DTensors it can reshard.

The segment graphs keep reading the full parameter objects they were lowered with (through
``get_attr``), whose storage is resized to zero between steps, as FSDP2 does with its
unsharded parameters. At the start of a call every full parameter is all-gathered over dp in
buckets (``Transport.all_gather_into_async``, bounded by the helix timeout) and written back
into that storage, so the schedule, shipped weights (sent from the full tensor) and the
gradient hook see exactly what the replicated mode sees. Parameters are gathered once per
call, not once per micro batch (re-gathering per micro batch would multiply the all-gathers
by M: torchtitan's choice with pipeline parallelism too).

Gradients reuse ``GradientReducer``'s buckets and instruction hook: as a bucket's last
contributing ``B`` ends, its full gradients are reduce-scattered (a sum, as the replicated
mode's all-reduce: the loss already divides by the whole mesh's total) and dropped; the step's
end waits for the rest (shared parameters are summed over their pipeline ranks first) and adds
each rank's part into its shard's ``.grad``. A call starts with no full gradient, so each call
reduces only its own contribution: gradient accumulation over calls adds up in the shards.
Then the full parameters are freed again.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Shard

from ..errors import HelixError
from ..ir.stage_program import StageProgram
from .data_parallel import BUCKET_BYTES, GradientReducer, ReducerStats, _split


def _rows(n: int, rank: int, size: int) -> tuple[int, int]:
    """``torch.chunk``'s rows of dim 0 (``n`` rows) that dp rank ``rank`` of ``size`` holds."""
    c = math.ceil(n / size) if n else 0
    start = min(rank * c, n)
    return start, min(start + c, n)


class _Layout:
    """A bucket's rank-major flat layout: every rank's rows of each parameter, padded to
    ``ceil(rows / dp)`` rows, so that every rank sends and receives the same numel."""

    def __init__(self, names: list[str], full: dict[str, torch.Tensor], size: int):
        self.names = names
        self.size = size
        self.parts: list[tuple[str, int, int]] = []  # name, offset in one rank's part, padded numel
        off = 0
        for n in names:
            p = full[n]
            rows = p.shape[0]
            inner = p.numel() // rows
            padded = math.ceil(rows / size) * inner
            self.parts.append((n, off, padded))
            off += padded
        self.numel = off  # of one rank's part

    def rank_piece(self, t: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank ``rank``'s rows of ``t`` (a full tensor), flattened."""
        a, b = _rows(t.shape[0], rank, self.size)
        return t[a:b].reshape(-1)


class DpSharder:
    """The shards of one pipeline rank's owned parameters over dp, and their full tensors."""

    def __init__(self, stage: StageProgram, transport, mesh, *, bucket_bytes: int = BUCKET_BYTES):
        self.stage, self.transport, self.mesh = stage, transport, mesh
        self.rank, self.size = transport.rank, transport.world_size
        self.full: dict[str, torch.nn.Parameter] = dict(stage.params)  # what the graphs read
        scalars = [n for n, p in self.full.items() if p.dim() == 0 or p.shape[0] == 0]
        if scalars:
            raise HelixError(f"dp_shard=True shards parameters along dim 0, but {scalars[:5]} have no rows "
                             f"(0-dim or empty); make them 1-element vectors or use dp_shard=False")
        self.shards: dict[str, torch.nn.Parameter] = {}
        for name, p in self.full.items():
            self.shards[name] = torch.nn.Parameter(self.shard_of(p.detach()), requires_grad=p.requires_grad)
        self.layouts = [_Layout(names, self.full, self.size)
                        for names in _split(list(self.full), self.full, bucket_bytes)]
        self.resident = True
        self.gathered_bytes = 0  # of the last unshard
        self.pipe = None

    # ----------------------------------------------------------------- shards
    def shard_of(self, full: torch.Tensor) -> DTensor:
        """This dp rank's ``Shard(0)`` DTensor of ``full`` (a copy of its rows)."""
        a, b = _rows(full.shape[0], self.rank, self.size)
        return DTensor.from_local(full[a:b].clone(), self.mesh, [Shard(0)], run_check=False, shape=full.shape,
                                  stride=full.stride())

    def register(self, pipe: torch.nn.Module) -> None:
        """Put the shards in the pipeline's module tree in place of the full parameters and
        free the full ones' storage (the graphs keep the full objects: ``_graph_params``)."""
        from .state_dict import _holder

        self.pipe = pipe
        for name, shard in self.shards.items():
            path, _, leaf = name.rpartition(".")
            _holder(pipe, path).register_parameter(leaf, shard)
        pipe._graph_params = self.full
        for p in self.full.values():  # a private storage, so that the user's model keeps its own
            p.data = torch.empty_like(p)
        self.reshard()

    def current_shards(self) -> dict[str, torch.nn.Parameter]:
        """The shards as the module tree holds them now (``load_state_dict(assign=True)`` and
        ``to()`` may have replaced them)."""
        if self.pipe is None:
            return self.shards
        now = dict(self.pipe.named_parameters())
        return {n: now[n] for n in self.full}

    def local(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` for a ``load_state_dict`` of the shard ``name``: a full plain tensor becomes
        this rank's ``Shard(0)`` DTensor of it; anything else is returned as it is."""
        p = self.full.get(name)
        if p is None or isinstance(value, DTensor) or not isinstance(value, torch.Tensor):
            return value
        if tuple(value.shape) != tuple(p.shape):
            return value
        return self.shard_of(value.detach())

    # ----------------------------------------------------------------- unshard / reshard
    def unshard(self, step: int) -> None:
        """All-gather every full parameter over dp (bucketed, started together, each wait
        bounded by the timeout) into the storage the graphs read."""
        shards = self.current_shards()
        started = []
        for lay in self.layouts:
            first = shards[lay.names[0]]
            dtype, device = first.dtype, first.to_local().device
            send = torch.zeros(lay.numel, dtype=dtype, device=device)
            for n, off, _ in lay.parts:
                loc = shards[n].to_local().detach().reshape(-1)
                send[off:off + loc.numel()].copy_(loc)
            out = torch.empty(lay.numel * self.size, dtype=dtype, device=device)
            what = f"unshard over dp of {lay.names[0]}" + (f" and {len(lay.names) - 1} more"
                                                           if len(lay.names) > 1 else "") + f", step {step}"
            started.append((lay, send, out, self.transport.all_gather_into_async(out, send, what=what)))
        self.gathered_bytes = 0
        with torch.no_grad():
            for lay, _, out, handle in started:
                handle.wait()
                for n, off, _ in lay.parts:
                    p, shard = self.full[n], shards[n]
                    if p.dtype != shard.dtype or p.device != shard.to_local().device:
                        p.data = torch.empty(p.shape, dtype=shard.dtype, device=shard.to_local().device)
                    else:
                        p.untyped_storage().resize_(p.numel() * p.element_size())
                    rows = p.shape[0]
                    flat = p.view(rows, -1)
                    for r in range(self.size):
                        a, b = _rows(rows, r, self.size)
                        k = (b - a) * (p.numel() // rows if rows else 0)
                        base = r * lay.numel + off
                        flat[a:b].copy_(out[base:base + k].view(b - a, -1))
                    self.gathered_bytes += p.numel() * p.element_size()
        self.resident = True

    def reshard(self) -> None:
        """Drop the full parameters' storage and gradients (the graphs keep the objects)."""
        for p in self.full.values():
            p.grad = None
            p.untyped_storage().resize_(0)
        self.resident = False

    def full_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` (this rank's ``state_dict()``) with every shard replaced by its full tensor
        (one bounded all-gather per parameter, in the state dict's order on every dp rank)."""
        out = {}
        for k, v in state.items():
            if not isinstance(v, DTensor):
                out[k] = v.clone()
                continue
            rows = v.shape[0]
            inner = v.numel() // rows if rows else 0
            c = math.ceil(rows / self.size)
            loc = v.to_local().detach().reshape(-1)
            send = torch.zeros(c * inner, dtype=v.dtype, device=loc.device)
            send[:loc.numel()].copy_(loc)
            recv = torch.empty(c * inner * self.size, dtype=v.dtype, device=loc.device)
            self.transport.all_gather_into_async(recv, send, what=f"gather_state_dict of {k} over dp").wait()
            full = torch.empty(v.shape, dtype=v.dtype, device=loc.device)
            flat = full.view(rows, -1)
            for r in range(self.size):
                a, b = _rows(rows, r, self.size)
                flat[a:b].copy_(recv[r * c * inner:r * c * inner + (b - a) * inner].view(b - a, -1))
            out[k] = full
        return out


class ShardedGradientReducer(GradientReducer):
    """``GradientReducer``'s buckets and hook, reducing by reduce-scatter into the shards."""

    def __init__(self, stage: StageProgram, transport, sharder: DpSharder, *, bucket_bytes: int = BUCKET_BYTES):
        super().__init__(stage, transport, bucket_bytes=bucket_bytes)
        self.sharder = sharder

    def begin(self) -> None:
        # the full gradients start at None every call (dropped when reduced, and at reshard):
        # what a call's backward leaves in them is its own contribution
        self._before = {}
        self._inflight.clear()
        self.active = True
        self.stats = ReducerStats()

    def _start(self, names: list[str]) -> None:
        params = self.sharder.full
        lay = _Layout(names, params, self.sharder.size)
        first = params[names[0]]
        send = torch.zeros(lay.numel * lay.size, dtype=first.dtype, device=first.device)
        for n, off, _ in lay.parts:
            g = params[n].grad
            if g is None:
                continue
            for r in range(lay.size):
                piece = lay.rank_piece(g.detach(), r)
                base = r * lay.numel + off
                send[base:base + piece.numel()].copy_(piece)
            params[n].grad = None  # the full gradient is dropped once it is in the send buffer
        recv = torch.empty(lay.numel, dtype=first.dtype, device=first.device)
        what = f"gradient reduce-scatter over dp of {names[0]}" + (
            f" and {len(names) - 1} more" if len(names) > 1 else "")
        handle = self.transport.reduce_scatter_async(recv, send, what=what)
        self._inflight.append((names, (lay, send, recv), handle))

    def _write_back(self, names: list[str], payload) -> int:
        """Add a reduce-scattered bucket's rows into the shards' ``.grad``."""
        lay, send, recv = payload
        shards = self.sharder.current_shards()
        for n, off, _ in lay.parts:
            shard = shards[n]
            loc = shard.to_local()
            part = recv[off:off + loc.numel()].view_as(loc)
            if shard.grad is None:
                shard.grad = DTensor.from_local(part.clone(), shard.device_mesh, shard.placements,
                                                run_check=False, shape=shard.shape, stride=shard.stride())
            else:
                shard.grad.to_local().add_(part.to(shard.grad.dtype))
        return send.numel() * send.element_size()


def parameter_bytes(pipe) -> dict[str, int]:
    """This rank's resident bytes now: of its parameters (local shards under dp_shard, plus
    any full parameter storage), and of their gradients."""
    def local(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.untyped_storage().nbytes()

    params = sum(local(p) for p in pipe.parameters())
    grads = sum(local(p.grad) for p in pipe.parameters() if p.grad is not None)
    graph = getattr(pipe, "_graph_params", None)
    if graph:
        params += sum(p.untyped_storage().nbytes() for p in graph.values())
        grads += sum(p.grad.untyped_storage().nbytes() for p in graph.values() if p.grad is not None)
    return {"params": params, "grads": grads}
