"""Cheap checks that the ranks of one pipeline hold the same thing: a batch, a compiled
program, a tied weight. Each rank hashes locally (one pass over the data) and the ranks
compare the hashes in one bounded collective before anything depends on them."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import HelixError

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@functools.lru_cache(maxsize=8)
def _weights(n: int) -> torch.Tensor:
    return torch.randint(-(2**62), 2**62, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.int64)


def tensor_hash(t: torch.Tensor) -> int:
    """A 63-bit hash of a tensor's shape, dtype and exact bits (equal tensors, equal hash).
    Integer arithmetic wraps, so the value is the same on every machine."""
    x = t.detach().reshape(-1)
    if x.is_floating_point() or x.is_complex():  # compare bits, not values
        x = x.contiguous()
        x = x.view(_BITS[x.element_size()]) if x.element_size() in _BITS else x.view(torch.uint8)
    x = x.to(torch.int64).cpu()
    h = int((x * _weights(max(x.numel(), 1))[:x.numel()]).sum()) if x.numel() else 0
    meta = zlib.crc32(f"{tuple(t.shape)} {t.dtype}".encode())  # not hash(): salted per process
    return (h ^ meta) & (2**63 - 1)


@dataclass(frozen=True)
class Agreement:
    """One thing the ranks must hold equal: this rank's ``values``, compared among ``ranks``
    (default: all); ``describe(rank, values)`` names a row in the error (default: the ints)."""

    values: tuple[int, ...]
    what: str
    fix: str
    ranks: tuple[int, ...] | None = None
    describe: Callable[[int, tuple[int, ...]], str] | None = None


def agree_all(transport, agreements: Sequence[Agreement]) -> None:
    """Raise on every rank unless every agreement holds, in one collective.

    One SUM all-reduce of a ``world x (total values)`` table in which each rank fills its own
    row: every rank then sees every row, so all raise together (the first agreement that
    fails). Ranks outside an agreement's ``ranks`` join with zeros (they need not hold the
    thing compared)."""
    world, rank = transport.world_size, transport.rank
    widths = [len(a.values) for a in agreements]
    table = torch.zeros((world, sum(widths)), dtype=torch.int64)
    col = 0
    for a, w in zip(agreements, widths, strict=True):
        if w and (a.ranks is None or rank in a.ranks):
            table[rank, col:col + w] = torch.tensor(a.values, dtype=torch.int64)
        col += w
    transport.all_reduce_(table, what="agreement on " + " and ".join(a.what for a in agreements))
    col = 0
    for a, w in zip(agreements, widths, strict=True):
        rows = {r: tuple(int(v) for v in table[r, col:col + w]) for r in (range(world) if a.ranks is None else a.ranks)}
        col += w
        if len(set(rows.values())) > 1:
            describe = a.describe or (lambda r, v: str(v))
            seen = ", ".join(f"rank {r}: {describe(r, v)}" for r, v in rows.items())
            raise HelixError(f"rank {rank}: the ranks disagree on {a.what} ({seen}); {a.fix}")


def agree(transport, values: tuple[int, ...], *, what: str, fix: str,
          ranks: tuple[int, ...] | None = None) -> None:
    """Raise on every rank unless ``ranks`` (default: all) hold the same ``values`` (one
    collective; see :func:`agree_all`)."""
    agree_all(transport, [Agreement(tuple(values), what, fix, ranks)])
