"""Running a function on several ranks: :func:`spawn_ranks` (tests, examples, benchmarks;
one process per rank on this machine) and :func:`init_from_env` (under torchrun).

Everything that touches ``torch.distributed`` goes through :mod:`.groups` and :mod:`.failures`.

spawn_ranks in short:

* children start through ``torch.multiprocessing`` with the ``"forkserver"`` start method
  by default: a clean, single-threaded server process imports torch and this package once
  per parent process and forks each rank from it (about 0.1 s per spawn instead of several
  seconds of torch import per rank with ``"spawn"``, which stays available through
  ``start_method="spawn"``). Children get the server's environment plus ``env=``: pass
  environment variables through ``env``, not by setting ``os.environ`` in the parent after
  the first call;
* the parent hosts the TCPStore (on a free loopback port it gets from the OS, so there is
  no port race and the store outlives any rank that dies);
* every child sets ``torch.set_num_threads(num_threads)`` (default 1), initializes the
  default process group over that store, and runs ``fn(rank, *args)``;
* a child that raises records the failure in the store (so other ranks' RuntimeFailures
  name it), sends its exception and traceback to the parent and exits at once: its sockets
  close, and every rank waiting on it fails immediately instead of hanging;
* the parent raises :class:`RankFailed` for the first failure (the first that is not a
  RuntimeFailure cascade, if any), with the child's traceback and a line per other rank;
  after the first failure it waits ``grace`` seconds for the others, then kills them;
* an overall ``timeout`` bounds everything: nothing can hang the parent;
* a rank that finished keeps its process (and sockets) until every rank has finished, so a
  fast rank never cuts a slow peer's connection.
"""

from __future__ import annotations

import datetime
import multiprocessing.connection as mpc
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

from ..errors import RuntimeFailure
from . import failures, groups

__all__ = ["RankFailed", "RankInfo", "init_from_env", "spawn_ranks"]

_RELEASE_KEY = "helix_spawn/release"


class RankFailed(RuntimeFailure):
    """A rank of :func:`spawn_ranks` raised, died or did not finish in time.

    Fields (besides RuntimeFailure's): ``exc_type`` (name of the child's exception type,
    or ``"died"`` / ``"timeout"``), ``child_message``, ``child_traceback`` (text) and
    ``original`` (the child's exception object when it could be pickled, else None)."""

    def __init__(self, message: str = "", *, rank: int | None = None, exc_type: str = "",
                 child_message: str = "", child_traceback: str = "",
                 original: BaseException | None = None) -> None:
        super().__init__(message, rank=rank)
        self.exc_type = exc_type
        self.child_message = child_message
        self.child_traceback = child_traceback
        self.original = original


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def init_from_env(timeout: float = groups.DEFAULT_TIMEOUT_S, *, backend: str | None = None,
                  num_threads: int | None = None) -> RankInfo:
    """Initialize the default process group from torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL with
    ``cuda:LOCAL_RANK`` when CUDA is available, else gloo on CPU; ``timeout`` seconds is the
    process group timeout. Installs the excepthook that records an uncaught exception for the
    other ranks. Idempotent (returns the current state if already initialized)."""
    missing = [k for k in ("RANK", "WORLD_SIZE") if k not in os.environ]
    if missing and not groups.is_initialized():
        raise RuntimeFailure(
            f"init_from_env: {', '.join(missing)} not set; run the script under "
            f"`torchrun --nproc-per-node N script.py`, or run the function through "
            f"helix_compiler.runtime.launch.spawn_ranks(fn, N)")
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if not groups.is_initialized():
        groups.init_group(backend, rank, world_size, timeout_s=timeout,
                             device_id=device if backend == "nccl" else None)
    failures.install_failure_excepthook()
    return RankInfo(rank, world_size, local_rank, device, backend)


# --------------------------------------------------------------------------------------
# spawn_ranks


def _child_main(rank: int, world_size: int, host: str, port: int, fn: Callable[..., Any],
                args: tuple[Any, ...], backend: str, comm_timeout: float, num_threads: int,
                env: dict[str, str], overall_timeout: float, conn: Any) -> None:
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": host, "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size)})
    torch.set_num_threads(num_threads)
    store = None
    code = 0
    try:
        store = groups.connect_store(host, port, timeout_s=max(comm_timeout, 30.0))
        groups.init_group(backend, rank, world_size, store=store, timeout_s=comm_timeout)
        result = fn(rank, *args)
        try:
            conn.send(("ok", rank, result))
        except Exception as e:  # noqa: BLE001 - an unpicklable result
            raise RuntimeFailure(f"rank {rank}: the result of {getattr(fn, '__name__', fn)} "
                                 f"cannot be sent to the parent: {e}") from e
    except BaseException as e:  # noqa: BLE001 - report everything, SystemExit included
        code = 1
        tb = traceback.format_exc()
        reason = f"rank {rank}: {type(e).__name__}: {e}"
        if groups.is_initialized():
            failures.report_failure(reason)
        elif store is not None:
            failures.report_failure(reason, store=store)
        try:
            original = pickle.dumps(e)
        except Exception:  # noqa: BLE001
            original = None
        try:
            conn.send(("err", rank, type(e).__name__, str(e), tb, original))
        except Exception:  # noqa: BLE001
            pass
    else:
        # Keep this process (and its sockets) until every rank has reported, so that a
        # peer still reading data this rank sent is never cut off.
        try:
            store.wait([_RELEASE_KEY], datetime.timedelta(seconds=overall_timeout))
        except Exception:  # noqa: BLE001 - parent gone or timed out: just exit
            pass
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        # Exit without running interpreter teardown (process group destructors can block
        # on a dead peer); the kernel closes the sockets, which is what peers need to see.
        os._exit(code)


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


_PRELOAD = ["torch", "helix_compiler.runtime.transport", "helix_compiler.runtime.launch"]


def _context(start_method: str) -> Any:
    """``"forkserver"``: children are forked from a clean server process that has imported
    torch and this package once (per parent process), so a rank starts in well under a
    second instead of re-importing torch (seconds per rank on a loaded 2-core machine). It
    has the safety of ``"spawn"`` (the server has no threads, no CUDA, no process group)."""
    if start_method == "forkserver":
        try:
            ctx = mp.get_context("forkserver")
        except ValueError:  # not available on this platform
            return mp.get_context("spawn")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return mp.get_context(start_method)


def spawn_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
                backend: str = "gloo", comm_timeout: float | None = None, num_threads: int = 1,
                env: dict[str, str] | None = None, return_exceptions: bool = False,
                grace: float = 3.0, start_method: str = "forkserver") -> list[Any]:
    """Run ``fn(rank, *args)`` on ``world_size`` spawned ranks of one process group and
    return their results (a list indexed by rank; results must be picklable).

    ``fn`` must be importable by the children (a module-level function); ``args`` must be
    picklable. ``start_method`` is ``"forkserver"`` (default, fast) or ``"spawn"``. ``timeout`` bounds
    the whole call (start-up included); ``comm_timeout`` (default ``min(timeout, 60)``) is
    the process group timeout. ``env`` is added to each child's environment (e.g.
    ``HELIX_TRANSPORT_TIMEOUT``). With ``return_exceptions=True`` failed ranks appear in the
    list as :class:`RankFailed` objects and nobody is killed early; otherwise the first
    failure is raised as RankFailed, and ``grace`` seconds later the remaining ranks are
    killed."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    comm_timeout = float(min(timeout, groups.DEFAULT_TIMEOUT_S) if comm_timeout is None
                         else comm_timeout)
    host = "127.0.0.1"
    ctx = _context(start_method)
    store = groups.host_store(host, timeout_s=timeout + 30.0)
    port = store.port
    procs: list[Any] = []
    conns: list[Any] = []
    results: list[Any] = [None] * world_size
    failures: dict[int, RankFailed] = {}
    order: list[int] = []  # failures in arrival order
    timed_out = False
    reported: set[int] = set()
    start = time.monotonic()
    try:
        for rank in range(world_size):
            recv_end, send_end = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_child_main, name=f"helix-rank{rank}",
                args=(rank, world_size, host, port, fn, args, backend, comm_timeout,
                      num_threads, dict(env or {}), timeout + 30.0, send_end))
            p.start()
            send_end.close()
            procs.append(p)
            conns.append(recv_end)
        live = set(range(world_size))
        deadline = start + timeout
        kill_at: float | None = None
        while live:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if kill_at is not None and now >= kill_at:
                break
            until = deadline if kill_at is None else min(deadline, kill_at)
            waitables = {conns[r]: r for r in live}
            waitables.update({procs[r].sentinel: r for r in live})
            ready = mpc.wait(list(waitables), timeout=max(until - now, 0.0))
            for obj in ready:
                rank = waitables[obj]
                if rank not in live:
                    continue
                msg = None
                if conns[rank].poll():
                    try:
                        msg = conns[rank].recv()
                    except (EOFError, OSError):
                        msg = None
                elif obj is conns[rank]:
                    continue  # spurious
                if msg is None:
                    if obj is not procs[rank].sentinel and procs[rank].is_alive():
                        continue
                    procs[rank].join(1.0)
                    how = _describe_exit(procs[rank].exitcode)
                    failures[rank] = RankFailed(
                        f"rank {rank} of {world_size} died without reporting a result ({how}); "
                        f"its stderr above says why (a C++ abort, e.g. gloo receiving a message "
                        f"larger than the posted buffer, or a crash)",
                        rank=rank, exc_type="died", child_message=how)
                    order.append(rank)
                elif msg[0] == "ok":
                    results[rank] = msg[2]
                else:
                    _, _, exc_type, message, tb, pickled = msg
                    original = None
                    if pickled is not None:
                        try:
                            original = pickle.loads(pickled)
                        except Exception:  # noqa: BLE001
                            original = None
                    failures[rank] = RankFailed(
                        f"rank {rank} of {world_size} failed with {exc_type}: {message}",
                        rank=rank, exc_type=exc_type, child_message=message,
                        child_traceback=tb, original=original)
                    order.append(rank)
                live.discard(rank)
                reported.add(rank)
                if failures and kill_at is None and not return_exceptions:
                    kill_at = time.monotonic() + grace
        for rank in sorted(live):
            what = (f"did not finish within the {timeout:g} s timeout of spawn_ranks"
                    if timed_out else "was still running when spawn_ranks killed it after the "
                    "failure of another rank")
            failures[rank] = RankFailed(f"rank {rank} of {world_size} {what}", rank=rank,
                                        exc_type="timeout" if timed_out else "killed",
                                        child_message=what)
            if timed_out:
                order.append(rank)
    finally:
        try:
            store.set(_RELEASE_KEY, "1")
        except Exception:  # noqa: BLE001
            pass
        # ranks that reported exit on the release key; the others are killed right away
        end = time.monotonic() + 5.0
        for rank, p in enumerate(procs):
            if rank in reported:
                p.join(max(end - time.monotonic(), 0.05))
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(1.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)
        for c in conns:
            c.close()
        del store

    if return_exceptions:
        return [failures.get(r, results[r]) for r in range(world_size)]
    if failures:
        raise _primary_failure(failures, order, world_size, time.monotonic() - start)
    return results


def _primary_failure(failures: dict[int, RankFailed], order: list[int], world_size: int,
                     elapsed: float) -> RankFailed:
    roots = [r for r in order if failures[r].exc_type not in ("RuntimeFailure", "killed")]
    primary_rank = (roots or order or sorted(failures))[0]
    primary = failures[primary_rank]
    lines = [str(primary)]
    if primary.child_traceback:
        lines += [f"--- traceback of rank {primary_rank} ---", primary.child_traceback.rstrip()]
    others = [r for r in range(world_size) if r != primary_rank]
    if others:
        lines.append(f"--- other ranks (after {elapsed:.1f} s) ---")
        for r in others:
            f = failures.get(r)
            if f is None:
                lines.append(f"rank {r}: finished")
            else:
                first = f.child_message.splitlines()[0] if f.child_message else str(f)
                lines.append(f"rank {r}: {f.exc_type}: {first}")
    err = RankFailed("\n".join(lines), rank=primary_rank, exc_type=primary.exc_type,
                     child_message=primary.child_message,
                     child_traceback=primary.child_traceback, original=primary.original)
    if primary.original is not None:
        err.__cause__ = primary.original
    return err
