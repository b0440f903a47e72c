"""Optimizer state sharded over the data-parallel replicas (ZeRO stage 1), with torch's own
``ZeroRedundancyOptimizer``.

Each dp replica of a pipeline rank holds the same parameters (its owned ones, or their tp
shards) and, after the backward half, the same dp-summed gradients. ``sharded_optimizer``
gives each of the dp ranks the optimizer state of about ``1/dp`` of those parameters: it
steps its part and broadcasts the updated values to the other replicas. Parameters and
gradients stay whole on every replica (ZeRO-1); with Adam the state is 8 bytes per fp32
parameter element (two moments), so a rank keeps ``8/dp`` instead of 8 (measured in
BENCHMARKS.md, ``benchmarks/dp_overhead.py``).
"""

from __future__ import annotations

import torch

from ..errors import HelixError


def sharded_optimizer(pipe, optimizer_class: type[torch.optim.Optimizer], **defaults) -> torch.optim.Optimizer:
    """``optimizer_class(pipe.parameters(), **defaults)`` with its state sharded over the
    pipeline's dp group (``torch.distributed.optim.ZeroRedundancyOptimizer``); without data
    parallelism the plain optimizer. Every dp rank must call it (a collective at each step)."""
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise HelixError(f"optimizer_class={optimizer_class!r} must be a torch.optim.Optimizer subclass, "
                         f"e.g. torch.optim.AdamW")
    params = list(pipe.parameters())
    if getattr(pipe, "dp_shard", False):
        raise HelixError("sharded_optimizer: this pipeline was compiled with dp_shard=True, whose parameters "
                         "(and so any optimizer's state) are already sharded over dp; use the plain optimizer, "
                         f"{optimizer_class.__name__}(pipe.parameters(), ...)")
    if pipe.dp_size == 1:
        return optimizer_class(params, **defaults)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class,
                                   process_group=pipe.dp_transport.group, **defaults)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in this rank's optimizer state (its shard under ZeRO; the local
    shards of DTensor state under ``dp_shard``)."""
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer wraps the local one
    return sum(_local(v).numel() * v.element_size() for state in inner.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
