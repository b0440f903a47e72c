"""Placement: which stage runs each chain segment of each micro batch.

* Helix (HELIXPIPE.md 1.2/1.3): ``E``, ``PL`` (kind "final") and ``H`` on stage 0 (``H`` may
  be moved with ``head_stage``; a compiled program's default is ``default_head_stage``'s rule);
  parameter chunk ``P(l)``, ``l < L``, on stage ``l mod p``;
  attention ``A(l)`` of micro batch ``m`` with offset ``d = floor((m mod pF) / F)`` on stage
  ``(l + d) mod p``. ``L % p != 0`` is allowed (cyclic dealing: the first ``L mod p`` stages
  own one chunk more).
* Contiguous (GPipe, 1F1B, ZB1P) and interleaved 1F1B: layer ``l`` (its ``A(l)`` and ``P(l)``)
  on the (virtual) stage owning it; ``E`` with layer 1, ``H`` right after ``PL`` on the last
  (virtual) stage. Virtual stage ``c`` (model chunk) lives on rank ``c mod p``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ScheduleError
from ..ir.segment import SegmentCost, SegmentSpec
from ..sim.costs import attention_fraction


@dataclass(frozen=True)
class Placement:
    """``table[c][m]`` = stage of chain segment ``c`` for micro batch ``m``.

    ``chunk[c]`` = the virtual stage (model chunk, ``0..num_chunks-1``) owning segment ``c``
    for layer-wise placements, ``None`` for helix.
    """

    kind: str
    num_stages: int
    num_microbatches: int
    num_folds: int
    num_layers: int
    table: tuple[tuple[int, ...], ...]
    chunk: tuple[int, ...] | None = None
    num_chunks: int | None = None

    def stage(self, seg: int, mb: int) -> int:
        return self.table[seg][mb]

    def offset(self, mb: int) -> int:
        """Helix offset ``d`` of a micro batch."""
        return (mb % (self.num_stages * self.num_folds)) // self.num_folds

    def segments_on(self, stage: int, mb: int) -> list[int]:
        return [c for c in range(len(self.table)) if self.table[c][mb] == stage]

    def describe(self) -> str:
        """A table like HELIXPIPE.md 1.3: one row per segment, one column per micro batch."""
        from ..ir.segment import chain_specs

        specs = chain_specs(self.num_layers)
        cols = range(min(self.num_microbatches, self.num_stages * self.num_folds))
        lines = ["seg  | " + " ".join(f"m{m:<2d}" for m in cols)]
        for s in specs:
            lines.append(f"{s.name:<4s} | " + " ".join(f"{self.table[s.index][m]:<3d}" for m in cols))
        return "\n".join(lines)


def _check_common(num_layers: int, num_stages: int, num_microbatches: int) -> None:
    for name, v, lo in (("num_layers", num_layers, 1), ("num_stages", num_stages, 1),
                        ("num_microbatches", num_microbatches, 1)):
        if not isinstance(v, int) or v < lo:
            raise ScheduleError(f"{name}={v!r} must be an int >= {lo}")


def helix_placement(num_layers: int, num_stages: int, num_microbatches: int, num_folds: int = 2,
                    *, head_stage: int | None = None) -> Placement:
    _check_common(num_layers, num_stages, num_microbatches)
    p, F, M, L = num_stages, num_folds, num_microbatches, num_layers
    if not isinstance(F, int) or F < 1:
        raise ScheduleError(f"num_folds={F!r} must be an int >= 1 (HelixPipe uses 2)")
    if M % (p * F):
        lo = p * F
        below = M // lo * lo
        options = [below, below + lo] if below else [lo, 2 * lo]
        raise ScheduleError(
            f"helix: num_microbatches={M} must be a multiple of num_stages*num_folds="
            f"{p}*{F}={lo}; use {options[0]} or {options[1]}")
    h = 0 if head_stage is None else head_stage
    if not isinstance(h, int) or not 0 <= h < p:
        raise ScheduleError(f"head_stage={head_stage!r} must be a stage in 0..{p - 1} or None")
    rows: list[tuple[int, ...]] = [tuple(0 for _ in range(M))]  # E
    for layer in range(1, L + 1):
        rows.append(tuple((layer + (m % (p * F)) // F) % p for m in range(M)))  # A(l)
        owner = 0 if layer == L else layer % p
        rows.append(tuple(owner for _ in range(M)))  # P(l) / PL
    rows.append(tuple(h for _ in range(M)))  # H
    return Placement("helix", p, M, F, L, tuple(rows))


def layer_partition(num_layers: int, num_parts: int) -> list[tuple[int, int]]:
    """Contiguous, balanced split of layers 1..L into ``num_parts`` (first, last) ranges;
    the first ``L mod n`` parts get one layer more."""
    if num_layers < num_parts:
        raise ScheduleError(
            f"cannot split num_layers={num_layers} into {num_parts} pipeline chunks of at least "
            f"one layer; use at most {num_layers} (virtual) stages")
    q, r = divmod(num_layers, num_parts)
    out, first = [], 1
    for k in range(num_parts):
        n = q + (1 if k < r else 0)
        out.append((first, first + n - 1))
        first += n
    return out


def layerwise_placement(num_layers: int, num_stages: int, num_microbatches: int,
                        *, virtual_stages: int = 1, kind: str = "1f1b") -> Placement:
    """Contiguous layers per (virtual) stage; virtual stage ``c`` on rank ``c mod p``."""
    _check_common(num_layers, num_stages, num_microbatches)
    n = num_stages * virtual_stages
    parts = layer_partition(num_layers, n)
    chunk_of_layer = {}
    for c, (a, b) in enumerate(parts):
        for layer in range(a, b + 1):
            chunk_of_layer[layer] = c
    chunk = [0]
    for layer in range(1, num_layers + 1):
        chunk += [chunk_of_layer[layer]] * 2
    chunk.append(n - 1)
    M = num_microbatches
    table = tuple(tuple(c % num_stages for _ in range(M)) for c in chunk)
    return Placement(kind, num_stages, M, 1, num_layers, table, tuple(chunk), n)


def stage_loads(placement: Placement, costs: Sequence[SegmentCost], *, micro_batch_size: int,
                seq_len: int, exclude: Sequence[int] = ()) -> list[float]:
    """Forward + backward FLOPs per stage over the whole iteration (attention counted with the
    fraction its kernels compute, ``sim.costs.attention_fraction``: causal, windowed, packed
    documents), leaving out the segments in ``exclude``."""
    loads = [0.0] * placement.num_stages
    nums = [c.at(micro_batch_size, seq_len) for c in costs]
    for c, row in enumerate(placement.table):
        if c in exclude:
            continue
        n = nums[c]
        cf = attention_fraction(costs[c], micro_batch_size=micro_batch_size, seq_len=seq_len)
        work = (n["flops_fwd"] + n["flops_bwd"]
                - (1 - cf) * (n["attention_flops_fwd"] + n["attention_flops_bwd"]))
        for m in range(placement.num_microbatches):
            loads[row[m]] += work
    return loads


def choose_head_stage(specs: Sequence[SegmentSpec], costs: Sequence[SegmentCost], *,
                      num_stages: int, num_microbatches: int, num_folds: int = 2,
                      micro_batch_size: int = 1, seq_len: int) -> int:
    """The stage the cost model says is least loaded without the head.

    Ties go to the lowest stage other than 0 (stage 0 also holds the embedding, and its
    forward ends last, with the final chunks of every micro batch, so a head placed there
    cannot overlap anything), then to 0. For ``L % p == 0`` every stage carries the same layer
    work (stage 0's ``E`` is cheap), so this picks stage 1, whose forward work ends first in
    the helix order; with uneven ``L % p`` it picks a stage with one parameter chunk less.
    """
    num_layers = (len(specs) - 2) // 2
    pl = helix_placement(num_layers, num_stages, num_microbatches, num_folds)
    loads = stage_loads(pl, costs, micro_batch_size=micro_batch_size, seq_len=seq_len,
                        exclude=(len(specs) - 1,))
    best = min(loads)
    tol = 1e-9 * max(1.0, abs(best))
    order = list(range(1, num_stages)) + [0]
    return next(r for r in order if loads[r] <= best + tol)


def default_head_stage(*, head_elements: int, mean_layer_elements: float) -> tuple[int | str, str]:
    """The helix head placement when the user gives no ``head_stage``: ``(head_stage, reason)``.

    The rule: ``"auto"`` (``choose_head_stage``, the stage the cost model finds least loaded)
    when the head's own parameters, those not tied to (shared with) another segment such as
    the embedding, hold at least half as many elements as the mean transformer layer; else
    stage 0, with the embedding (HelixPipe's placement). A large untied head then no longer
    stacks a second vocab x hidden matrix (and its work) on stage 0; a small or tied head stays:
    moving a tied head would duplicate the embedding matrix on another stage, no memory gained.
    """
    ratio = head_elements / mean_layer_elements if mean_layer_elements > 0 else 0.0
    sizes = (f"the head's own (untied) parameters: {head_elements} elements, {ratio:.2f}x the mean layer's "
             f"{mean_layer_elements:.0f}")
    if head_elements > 0 and ratio >= 0.5:
        return "auto", f"default: {sizes} >= 0.5x, so head_stage='auto' (least loaded stage)"
    return 0, f"default: {sizes} < 0.5x, so stage 0 (with the embedding)"
