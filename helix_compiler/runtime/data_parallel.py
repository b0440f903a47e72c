"""Data parallelism over the mesh's ``dp`` dimension: each pipeline rank's gradients summed
over its dp group, overlapped with the backward half.

Written here rather than taken from DDP or FSDP2: both drive the reduction from one
module's forward/backward, while a pipeline rank runs many segment graphs, each backward
once per micro batch, in an order that only the schedule knows. The schedule does know it:
a parameter's gradient is final after the last ``B`` instruction, on this rank, of a segment
that uses it (a shipped weight's gradient comes back to its owner's segment, so that is its
owner's ``B``). Parameters are bucketed by that instruction (and by size); the executor's
instruction hook starts a bucket's asynchronous all-reduce as soon as its instruction ends,
and the step's end waits for what is still in flight, so the step grows by little more than
the last bucket. Parameters shared between pipeline ranks (a tied embedding/head) are summed
over those ranks at the step's end first, and so are the partial gradients of parameters
every tp rank holds whole (norm weights under sequence parallelism) over the tp group; then
they are reduced here in the last buckets.

The step's loss divides by the step's total over the whole dp group (micro batches, or
counted tokens), so the reduction is a sum. Gradient accumulation over several calls keeps
working: each call reduces only its own contribution (the gradient before the call is kept
aside, as for shared parameters).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..ir.stage_program import StageProgram

BUCKET_BYTES = 25 * 2**20  # as DDP's default: few enough messages, early enough overlap


@dataclass
class ReducerStats:
    """Of the last step: buckets, bytes reduced, buckets started before the step's end, and
    the seconds the step's end waited for reductions (what overlap did not hide)."""

    buckets: int = 0
    nbytes: int = 0
    overlapped: int = 0
    exposed_s: float = 0.0


class GradientReducer:
    def __init__(self, stage: StageProgram, transport, *, bucket_bytes: int = BUCKET_BYTES):
        self.transport = transport  # over the dp group
        self.stage = stage
        self.bucket_bytes = bucket_bytes
        by_id = {id(p): name for name, p in stage.params.items()}
        last: dict[str, int] = {}  # parameter -> position of its last contributing B
        for k, i in enumerate(stage.instrs):
            if i.op == "B" and i.seg in stage.segments:
                for p in stage.segments[i.seg].gm.parameters():
                    if id(p) in by_id:
                        last[by_id[id(p)]] = k
        # summed over other groups first at the step's end: shared (pp) and partial (tp) gradients
        deferred = {*stage.shared, *stage.tp_partial_grads}
        self.buckets: dict[int, list[list[str]]] = {}  # instruction position -> buckets
        for k in sorted(set(last.values())):
            names = [n for n in stage.params if last.get(n) == k and n not in deferred]
            self.buckets[k] = _split(names, stage.params, bucket_bytes)
        self._position = {id(i): k for k, i in enumerate(stage.instrs)}
        self._before: dict[str, torch.Tensor | None] = {}
        self._inflight: list[tuple[list[str], torch.Tensor, object]] = []
        self.active = False
        self.stats = ReducerStats()

    def begin(self) -> None:
        """Before a training step: keep the gradients accumulated so far aside."""
        self._before = {n: (p.grad.clone() if p.grad is not None else None) for n, p in self.stage.params.items()}
        self._inflight.clear()
        self.active = True
        self.stats = ReducerStats()

    def hook(self, instr, start: float, end: float) -> None:
        """Executor instruction hook: start the buckets whose last contribution just ended."""
        if not self.active or instr.op != "B":
            return
        for names in self.buckets.get(self._position.get(id(instr), -1), ()):
            self._start(names)

    def finish(self) -> None:
        """After the step (and the shared parameters' sum over pipeline ranks): reduce what
        is left, wait for every bucket, and write the reduced gradients back."""
        if not self.active:
            return
        self.active = False
        t0 = time.perf_counter()
        self.stats.overlapped = len(self._inflight)
        started = {n for names, _, _ in self._inflight for n in names}
        rest = [n for n in self.stage.params if n not in started]
        for names in _split(rest, self.stage.params, self.bucket_bytes):
            self._start(names)
        with torch.no_grad():
            for names, payload, handle in self._inflight:
                handle.wait()
                self.stats.nbytes += self._write_back(names, payload)
                self.stats.buckets += 1
        self._inflight.clear()
        self.stats.exposed_s = time.perf_counter() - t0

    def _write_back(self, names: list[str], flat: torch.Tensor) -> int:
        """Put a reduced bucket's gradients in place; returns the bytes it reduced."""
        offset = 0
        for n in names:
            p = self.stage.params[n]
            part = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            before = self._before.get(n)
            p.grad = part.clone() if before is None else before + part
        return flat.numel() * flat.element_size()

    def abort(self) -> None:
        self.active = False
        self._inflight.clear()

    def _start(self, names: list[str]) -> None:
        params = self.stage.params
        parts = []
        for n in names:
            p, before = params[n], self._before.get(n)
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            parts.append((g - before if before is not None else g).reshape(-1))
        flat = torch.cat(parts) if parts else torch.zeros(0)
        what = f"gradient sum over dp of {names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
        self._inflight.append((names, flat, self.transport.all_reduce_async(flat, what=what)))


def _split(names: list[str], params, limit: int) -> list[list[str]]:
    """Consecutive groups of one dtype of at most ``limit`` bytes (a larger parameter alone)."""
    out: list[list[str]] = []
    size = 0
    for n in names:
        p = params[n]
        nbytes = p.numel() * p.element_size()
        if out and size + nbytes <= limit and params[out[-1][0]].dtype == p.dtype:
            out[-1].append(n)
            size += nbytes
        else:
            out.append([n])
            size = nbytes
    return out
