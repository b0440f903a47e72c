"""Failure reports shared by the ranks through the process group's store.

A failing rank records ``"rank r: ExcType: message"`` (:func:`report_failure`: called by
``spawn_ranks``, by the excepthook :func:`install_failure_excepthook` installs, and by a
Transport that fails); every RuntimeFailure quotes the reports found
(:func:`reported_failures`, :func:`reports_text`), so the message on any rank names the rank
that failed first and why.

Every store access here is bounded (:data:`STORE_BOUND_S`, half a second): the store may be
hosted by the rank that just died or stopped (a launch without torchrun's agent, where rank 0
hosts the TCPStore), and its client would otherwise block for the store's own timeout. An
access runs in a daemon thread joined with the bound; past it the store is marked
unreachable for the rest of the process and reports degrade to "no reports available
(store unreachable)".
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from . import groups

log = logging.getLogger(__name__)

__all__ = ["STORE_BOUND_S", "bounded_store_call", "install_failure_excepthook",
           "report_failure", "reported_failures", "reports_text"]

STORE_BOUND_S = 0.5
_PREFIX = "helix_transport_failure"
_UNREACHABLE: set[int] = set()  # id() of stores that did not answer within the bound
_T = TypeVar("_T")


class StoreUnreachable(Exception):
    pass


def bounded_store_call(store: Any, fn: Callable[[Any], _T], bound_s: float = STORE_BOUND_S) -> _T:
    """``fn(store)`` in a daemon thread, joined for ``bound_s`` seconds. Raises
    StoreUnreachable past the bound (and from then on at once for that store), or what
    ``fn`` raised."""
    if id(store) in _UNREACHABLE:
        raise StoreUnreachable("store marked unreachable earlier")
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, fn(store)))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box.append((False, e))

    th = threading.Thread(target=run, name="helix-store-op", daemon=True)
    th.start()
    th.join(bound_s)
    if not box:
        _UNREACHABLE.add(id(store))
        raise StoreUnreachable(f"no answer within {bound_s:g} s")
    ok, value = box[0]
    if not ok:
        raise value
    return value


def report_failure(reason: str, group: Any = None, store: Any = None) -> None:
    """Record ``reason`` (e.g. ``"rank 2: ValueError: ..."``) in the store shared by the
    ranks, so that every other rank's RuntimeFailure can quote it. Best effort: never
    raises, returns within about :data:`STORE_BOUND_S` even when the store is gone."""
    store = store if store is not None else groups.store_of(group)
    if store is None:
        return

    def put(s: Any) -> None:
        n = s.add(f"{_PREFIX}/count", 1)
        s.set(f"{_PREFIX}/{n}", reason[:4000])

    try:
        bounded_store_call(store, put)
    except Exception:  # noqa: BLE001
        log.debug("could not record failure in the store", exc_info=True)


def _read(store: Any, limit: int) -> list[str]:
    def get(s: Any) -> list[str]:
        out = []
        n = s.add(f"{_PREFIX}/count", 0)
        for i in range(1, min(n, limit) + 1):
            key = f"{_PREFIX}/{i}"
            if s.check([key]):
                out.append(s.get(key).decode("utf-8", errors="replace"))
        return out

    return bounded_store_call(store, get)


def reported_failures(group: Any = None, store: Any = None, limit: int = 8) -> list[str]:
    """The failure reports recorded so far, first one first (empty if none, no store, or
    the store did not answer within the bound)."""
    store = store if store is not None else groups.store_of(group)
    if store is None:
        return []
    try:
        return _read(store, limit)
    except Exception:  # noqa: BLE001
        log.debug("could not read failure reports from the store", exc_info=True)
        return []


def reports_text(store: Any) -> str:
    """The lines a RuntimeFailure appends: the reports so far, or why there are none."""
    if store is None:
        return ""
    try:
        reports = _read(store, 8)
    except StoreUnreachable:
        return "\nno failure reports available (store unreachable)"
    except Exception:  # noqa: BLE001 - store gone (connection refused / reset)
        return "\nno failure reports available (store unreachable)"
    if not reports:
        return ""
    return ("\nFailures reported by ranks so far (the first is the likely root cause):\n  "
            + "\n  ".join(reports))


_HOOK_INSTALLED = False


def install_failure_excepthook(group: Any = None) -> None:
    """Chain ``sys.excepthook`` so that an uncaught exception on this rank is recorded in the
    store (see :func:`report_failure`) before the process dies. Idempotent."""
    global _HOOK_INSTALLED
    if _HOOK_INSTALLED:
        return
    previous = sys.excepthook

    def hook(tp: type[BaseException], value: BaseException, tb: Any) -> None:
        try:
            report_failure(f"rank {groups.group_rank()}: {tp.__name__}: {value}", group)
        except Exception:  # noqa: BLE001
            pass
        previous(tp, value, tb)

    sys.excepthook = hook
    _HOOK_INSTALLED = True
