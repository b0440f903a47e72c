"""How a tensor is split over the ranks of a tensor-parallel group (shared by the compiler's
tensor-parallel pass and the runtime, which slices parameters and puts them back together).

``Sharded(dim, groups)``: dimension ``dim`` is cut into ``groups`` equal contiguous blocks
and every block into ``tp`` equal pieces; rank ``r`` holds piece ``r`` of every block, in
block order. ``groups=1`` is a plain split; a fused q/k/v weight (``[3h, h]``) is sharded
with ``groups=3`` so that each rank's rows are its heads' q, k and v rows, and the split of
the fused output into q, k and v still works on the local tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sharded:
    dim: int
    groups: int = 1

    def local_size(self, size: int, tp: int) -> int:
        if size % (self.groups * tp):
            raise ValueError(f"size {size} of dimension {self.dim} does not split into {self.groups} x {tp}")
        return size // tp

    def ranges(self, size: int, rank: int, tp: int) -> list[tuple[int, int]]:
        """``(start, length)`` along ``dim`` of rank ``rank``'s parts, one per block."""
        block = size // self.groups
        piece = self.local_size(size, tp) // self.groups
        return [(g * block + rank * piece, piece) for g in range(self.groups)]

    def local(self, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
        """Rank ``rank``'s piece of ``full`` (a view when ``groups == 1``)."""
        parts = [full.narrow(self.dim, start, n) for start, n in self.ranges(full.shape[self.dim], rank, tp)]
        return parts[0] if self.groups == 1 else torch.cat(parts, self.dim)

    def full_shape(self, local_shape, tp: int) -> tuple[int, ...]:
        shape = list(local_shape)
        shape[self.dim] *= tp
        return tuple(shape)

    def unshard(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's piece, in rank order."""
        per_rank = [p.chunk(self.groups, self.dim) for p in pieces]
        return torch.cat([part[g] for g in range(self.groups) for part in per_rank], self.dim)

    def __str__(self) -> str:
        return f"Shard(dim={self.dim}{f', groups={self.groups}' if self.groups > 1 else ''})"


@dataclass(frozen=True)
class SeqSplit(Sharded):
    """A split along the sequence (sequence parallelism), between the parallel regions."""

    def __str__(self) -> str:
        return f"SeqShard(dim={self.dim})"
