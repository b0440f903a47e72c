"""Process groups and stores: the thin layer over ``torch.distributed`` that
:mod:`.launch`, :mod:`.failures` and :mod:`.transport` share (launch itself never imports
``torch.distributed``).

``init_group`` / ``destroy_group`` / ``is_initialized`` wrap the default group;
``host_store`` / ``connect_store`` make TCPStores; ``store_of(group)`` finds the store a
group rendezvoused through; ``group_rank`` / ``global_rank`` / ``group_size`` translate
between a group's ranks and global ranks (a Transport speaks group ranks).
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_TIMEOUT_S", "connect_store", "default_group", "destroy_group",
           "global_rank", "group_rank", "group_size", "host_store", "init_group",
           "is_initialized", "store_of"]

DEFAULT_TIMEOUT_S = 60.0


def host_store(host: str = "127.0.0.1", timeout_s: float = 300.0) -> Any:
    """Start a TCPStore server on a free port of ``host`` in this process (``.port``)."""
    return dist.TCPStore(host, 0, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def connect_store(host: str, port: int, timeout_s: float = 300.0) -> Any:
    """A client of the TCPStore at ``host:port``."""
    return dist.TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=timeout_s))


def init_group(backend: str, rank: int | None = None, world_size: int | None = None, *,
               store: Any = None, timeout_s: float = DEFAULT_TIMEOUT_S,
               device_id: torch.device | None = None) -> None:
    """``init_process_group`` with ``timeout_s`` as the process group timeout; with no store
    it rendezvouses through the environment (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
    ``WORLD_SIZE``), as under torchrun."""
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
    if store is not None:
        kwargs["store"] = store
    if rank is not None:
        kwargs["rank"] = rank
    if world_size is not None:
        kwargs["world_size"] = world_size
    if device_id is not None:
        kwargs["device_id"] = device_id
    dist.init_process_group(backend, **kwargs)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def destroy_group() -> None:
    if is_initialized():
        dist.destroy_process_group()


def default_group() -> Any:
    return dist.distributed_c10d._get_default_group()


def store_of(group: Any = None) -> Any:
    """The store ``group`` (default: the default group) was created over, or None."""
    try:
        pg = group if group is not None else default_group()
        return dist.distributed_c10d._world.pg_map[pg][1]
    except Exception:  # noqa: BLE001 - best effort: no store, no reports
        return None


def group_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (-1 when the default group is not initialized)."""
    if not is_initialized():
        return -1
    return dist.get_rank(group)


def group_size(group: Any = None) -> int:
    return dist.get_world_size(group)


def global_rank(group: Any, rank: int) -> int:
    """The global rank of ``group``'s rank ``rank`` (identity for the default group)."""
    if group is None:
        return rank
    return dist.get_global_rank(group, rank)
