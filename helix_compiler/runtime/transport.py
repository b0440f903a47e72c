"""Point-to-point messages and bounded collectives of the runtime, on one process group.

One :class:`Transport` per rank, over the default process group or a given one (ranks are
always ranks *of that group*):

* ``send(tensors, dst, fold=f, tag=...) -> SendHandle`` posts an asynchronous send. A
  completion thread per peer waits for that peer's sends in posting order (gloo p2p works
  report completion only through ``wait()``, which releases the GIL) and marks each one done;
  the calling thread drops the transport's references to completed sends' tensors in
  ``release_sent()`` (the executor calls it at the end of every instruction), so every free happens
  on the thread that allocated, where torch's profiler sees it, at a point of the program.
  A send completes only once the peer has posted the matching receive (gloo and NCCL
  point-to-point are rendezvous: a 1 KB gloo ``isend`` to a peer that posts 1 s later
  completes 1 s later); ``inflight_send_bytes()`` counts what is not completed yet. An error
  in that thread is raised on the calling thread at its next transport call, naming the
  send.
* ``recv(specs, src, fold=f, tag=...) -> RecvHandle`` posts the receive at once into fresh
  buffers; ``RecvHandle.wait()`` waits for that receive only (its header and payload).
* ``wait_fold(f)`` waits for fold ``f``'s sends and receives only; ``drain()`` for all.
* ``barrier``, ``broadcast_``, ``all_reduce_``, ``all_gather_``, ``gather_objects`` and
  ``agree`` are collectives bounded by the same timeout (not the process group's).

Matching. Messages between one (src, dst) pair match in FIFO order whatever the folds, so
the receiver posts its receives in the order the sender sends (the schedule validator
guarantees it offline); waiting order is free.

Header check (``check=``, env ``HELIX_TRANSPORT_CHECK``). ``"header"`` (default on gloo):
each message is preceded by a 512-byte header (:mod:`.wire`) on its own gloo slot; the
receiver compares it with what it posted and raises :class:`RuntimeFailure` naming the
expected and actual shapes, dtypes, fold and tag (so post with the sender's fold and tag,
e.g. "fwd A3 m5"). A message *larger* than the posted buffer makes gloo abort the receiving
process (C++ terminate); peers then see its connection close. ``"off"`` (default on NCCL):
no header; all ranks must agree.

Packing (``pack=True``, same on all ranks): the header and all tensors of a message travel
as one byte buffer; the receiver gets views into it.

Failures. Every wait has a deadline (``timeout`` seconds, default 60, env
``HELIX_TRANSPORT_TIMEOUT``). A rank that dies closes its sockets and every peer waiting on
it fails at once ("connection closed"); a hung rank is caught by the timeout. Every backend
error becomes a RuntimeFailure naming this rank, the peer, the message (tag), the fold and
the failure reports of other ranks (:mod:`.failures`, bounded store access).

Lifetime. A posted gloo request whose Work and buffer are freed before it completes
corrupts the pair's matching, so requests stay referenced until they complete, also after
a failure (a Transport garbage collected with pending requests hands them to a module-level
list, with a warning).
"""

from __future__ import annotations

import collections
import datetime
import logging
import os
import pickle
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import (
    AllgatherOptions,
    AllreduceOptions,
    BarrierOptions,
    BroadcastOptions,
    GatherOptions,
    ReduceOp,
    ReduceScatterOptions,
)

from ..errors import RuntimeFailure
from . import failures, groups
from .failures import install_failure_excepthook, report_failure, reported_failures
from .groups import (
    DEFAULT_TIMEOUT_S,
    connect_store,
    destroy_group,
    host_store,
    init_group,
    is_initialized,
)
from .wire import (
    HEADER_BYTES,
    HEADER_WORDS,
    Spec,
    build_header,
    fmt_specs,
    nbytes,
    norm_spec,
    packed_layout,
    parse_header,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "RecvHandle",
    "SendHandle",
    "Transport",
    "TransportStats",
    "connect_store",
    "destroy_group",
    "host_store",
    "init_group",
    "install_failure_excepthook",
    "is_initialized",
    "report_failure",
    "reported_failures",
]

ENV_TIMEOUT = "HELIX_TRANSPORT_TIMEOUT"
ENV_CHECK = "HELIX_TRANSPORT_CHECK"
CHECK_MODES = ("off", "header")

_TAG_PAYLOAD = 0  # gloo tag (slot) of payload messages
_TAG_HEADER = 1  # gloo tag of header messages (separate slot: headers match headers)

# Requests of failed or garbage-collected transports, kept for the life of the process (see
# "Lifetime" above).
_GRAVEYARD: list[Any] = []


@dataclass
class TransportStats:
    """Counters of one Transport (cheap; for timelines and benchmarks)."""

    sent_messages: int = 0
    sent_bytes: int = 0
    recv_messages: int = 0
    recv_bytes: int = 0
    wait_s: float = 0.0  # wall time spent inside waits


_PENDING, _DONE, _FAILED = 0, 1, 2
_SEND, _RECV = "send", "receive"


class _Op:
    __slots__ = ("kind", "peer", "fold", "tag", "seq", "specs", "works", "keep", "hdr_work",
                 "hdr_buf", "expected_hdr", "packed", "offsets", "state", "handle", "nbytes")

    def __init__(self, kind: str, peer: int, fold: int, tag: str, seq: int,
                 specs: list[Spec]) -> None:
        self.kind = kind
        self.peer = peer
        self.fold = fold
        self.tag = tag
        self.seq = seq
        self.specs = specs
        self.works: list[Any] | None = None
        self.keep: list[torch.Tensor] | None = None  # tensors the transfer reads or writes
        self.hdr_work: Any = None
        self.hdr_buf: torch.Tensor | None = None
        self.expected_hdr: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None
        self.offsets: list[int] | None = None
        self.state = _PENDING
        self.handle: RecvHandle | None = None
        self.nbytes = 0

    def describe(self) -> str:
        direction = "to" if self.kind == _SEND else "from"
        return (f"{self.kind} of {fmt_specs(self.specs)} {direction} rank {self.peer} "
                f"(fold {self.fold}, tag {self.tag!r}, message #{self.seq} {direction} that rank)")


class _SendState:
    """What the completion threads share with the transport (not the transport itself, so
    that it can be garbage collected)."""

    def __init__(self, cpu_blocking: bool) -> None:
        self.cv = threading.Condition(threading.Lock())
        self.inflight = 0
        self.waiters = 0
        self.error: tuple[_Op, BaseException, float] | None = None  # first failed send
        self.cpu_blocking = cpu_blocking
        self.completed: collections.deque[_Op] = collections.deque()  # done, tensors not yet dropped


def _complete_sends(q: queue.SimpleQueue, st: _SendState) -> None:
    """Body of a peer's completion thread: wait for its sends in posting order."""
    while True:
        op = q.get()
        if op is None:
            return
        if st.error is not None:  # the pair is broken: keep everything referenced
            _GRAVEYARD.append(op)
            continue
        t0 = time.monotonic()
        w = None
        try:
            for w in op.works or ():
                if w.wait() is False:
                    raise RuntimeError("Timed out waiting for the send")
                if not st.cpu_blocking:  # NCCL: wait() only orders streams
                    while not w.is_completed():
                        time.sleep(2e-4)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            _GRAVEYARD.append(op)
            with st.cv:
                if st.error is None:
                    st.error = (op, e, t0)
                op.state = _FAILED
                st.cv.notify_all()
            continue
        w = None  # the Work references the tensor too: the op's list keeps it to the release
        with st.cv:
            op.state = _DONE
            st.inflight -= op.nbytes
            st.completed.append(op)  # Transport.release_sent drops the tensors on the caller's thread
            if st.waiters:
                st.cv.notify_all()
        op = None


class _Handle:
    """What a posted send or receive is about: its peer, fold and tag."""

    __slots__ = ("_transport", "_op")

    @property
    def peer(self) -> int:
        return self._op.peer

    @property
    def fold(self) -> int:
        return self._op.fold

    @property
    def tag(self) -> str:
        return self._op.tag


class SendHandle(_Handle):
    """A posted send. ``done()`` says (without blocking) whether it completed and its
    tensors were released; ``wait(timeout)`` blocks until then."""

    __slots__ = ()

    def __init__(self, transport: Transport, op: _Op) -> None:
        self._transport = transport
        self._op = op

    def done(self) -> bool:
        return self._op.state == _DONE

    def wait(self, timeout: float | None = None) -> None:
        t = self._transport
        deadline = time.monotonic() + (t.timeout if timeout is None else timeout)
        t._wait_send(self._op, deadline)

    @property
    def nbytes(self) -> int:
        return self._op.nbytes

    def __repr__(self) -> str:
        return f"SendHandle({self._op.describe()}, {'done' if self.done() else 'pending'})"


class RecvHandle(_Handle):
    """A posted receive. ``wait()`` returns the received tensors (same order as the specs),
    waiting for this receive only; it is idempotent, and returns at once after
    ``wait_fold(fold)`` has completed it."""

    __slots__ = ("_result",)

    def __init__(self, transport: Transport, op: _Op) -> None:
        self._transport = transport
        self._op = op
        self._result: list[torch.Tensor] | None = None

    def wait(self, timeout: float | None = None) -> list[torch.Tensor]:
        if self._result is None:
            t = self._transport
            deadline = time.monotonic() + (t.timeout if timeout is None else timeout)
            t._complete_recv(self._op, deadline)
            assert self._result is not None
        return self._result

    @property
    def done(self) -> bool:
        """True once the data has been waited for (never polls the backend)."""
        return self._result is not None

    @property
    def specs(self) -> list[Spec]:
        return list(self._op.specs)

    def __repr__(self) -> str:
        state = "done" if self.done else "pending"
        return f"RecvHandle({self._op.describe()}, {state})"


class CollectiveHandle:
    """A started collective of a :class:`Transport` (``all_reduce_async``)."""

    def __init__(self, transport: Transport, work: Any, label: str, t0: float) -> None:
        self._transport, self._work, self.label, self._t0 = transport, work, label, t0
        self._done = False

    def wait(self) -> None:
        if not self._done:
            self._transport._complete_collective(self._work, self.label, self._t0)
            self._done = True


class Transport:
    """Point-to-point messages and bounded collectives between the ranks of one process
    group (see the module docstring for matching, fold, header and failure semantics).

    Ranks are ranks *of the group*. Use one Transport from one thread (its completion
    threads are internal).

    Args:
        group: the process group (default: the default group).
        timeout: seconds each wait or collective may take before it raises RuntimeFailure
            (default ``$HELIX_TRANSPORT_TIMEOUT`` or 60).
        check: ``"header"`` or ``"off"`` (default ``$HELIX_TRANSPORT_CHECK``, else
            ``"header"`` on gloo and ``"off"`` on NCCL). Same value on all ranks.
        pack: send all tensors of a message as one buffer (same value on all ranks).
        name: the group's name in error messages (a mesh dimension: "pp", "dp").
        device: where receive buffers are allocated (default: CPU on gloo, the current CUDA
            device otherwise).
    """

    def __init__(self, group: Any = None, *, timeout: float | None = None,
                 check: str | None = None, pack: bool = False,
                 device: torch.device | str | None = None, name: str = "") -> None:
        if not is_initialized():
            raise RuntimeFailure(
                "Transport needs an initialized process group: call "
                "helix_compiler.runtime.launch.init_from_env() under torchrun, or run the "
                "function through spawn_ranks()")
        self.group = group
        self._pg = group if group is not None else groups.default_group()
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.global_rank = dist.get_rank()
        # how errors name this rank: group ranks alone are ambiguous on a mesh
        self.who = (f"rank {self.rank}" if group is None or self.world_size == dist.get_world_size()
                    else f"rank {self.rank} of the {name + ' ' if name else ''}group (global rank {self.global_rank})")
        self.backend = str(dist.get_backend(group))
        if timeout is None:
            timeout = float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S))
        if not timeout > 0:
            raise ValueError(f"timeout={timeout} must be > 0 seconds")
        self.timeout = float(timeout)
        if check is None:
            check = os.environ.get(ENV_CHECK) or ("header" if self.backend == "gloo" else "off")
        if check not in CHECK_MODES:
            raise ValueError(f"check={check!r} must be one of {CHECK_MODES}")
        self.check = check
        self.pack = bool(pack)
        if device is None:
            device = torch.device("cpu") if self.backend == "gloo" else torch.device(
                "cuda", torch.cuda.current_device())
        self.device = torch.device(device)
        self._blocking_wait = self.backend == "gloo" or self.device.type == "cpu"
        self._pending: dict[int, list[_Op]] = {}
        self._sent_seq = [0] * self.world_size
        self._recv_seq = [0] * self.world_size
        self._hdr_cache: dict[Any, torch.Tensor] = {}
        self._compact_at: dict[int, int] = {}
        self._failed: RuntimeFailure | None = None
        self._store = groups.store_of(group)
        self._sends = _SendState(self._blocking_wait)
        self._queues: list[queue.SimpleQueue | None] = [None] * self.world_size
        self._ncoll = 0  # collectives so far (errors name the number: comparable across ranks)
        self.stats = TransportStats()

    # ---------------------------------------------------------------- messages

    def send(self, tensors: Sequence[torch.Tensor], dst: int, *, fold: int,
             tag: str = "") -> SendHandle:
        """Post an asynchronous send of ``tensors`` (one message) to ``dst``, filed under
        ``fold``. The transport keeps the tensors referenced until the send completes (then
        drops them, see :meth:`inflight_send_bytes`); do not modify them in place before
        ``handle.done()``."""
        if self._failed is not None or self._sends.error is not None:
            self._alive()
        if dst == self.rank or not 0 <= dst < self.world_size:
            self._check_peer(dst)
        self.release_sent()  # whoever drives the transport, completed sends do not pile up
        ts = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        self._sent_seq[dst] += 1
        op = _Op(_SEND, dst, fold, tag, self._sent_seq[dst],
                 [(tuple(t.shape), t.dtype) for t in ts])
        self._file(op)  # filed first: whatever is posted stays referenced, even on failure
        works: list[Any] = []
        op.works = works
        if self.pack:
            offsets, total = packed_layout(op.specs, self.check != "off")
            buf = torch.empty(total, dtype=torch.uint8, device=self.device)
            if self.check != "off":
                buf[:HEADER_BYTES].view(torch.int64).copy_(self._header(op.specs, fold, tag))
            for t, off in zip(ts, offsets, strict=True):
                n = t.numel() * t.element_size()
                if n:
                    buf[off:off + n].copy_(t.reshape(-1).view(torch.uint8))
            op.keep = [buf]
            op.nbytes = total
            self._post(op, True, buf, _TAG_PAYLOAD, works)
        else:
            op.keep = ts
            if self.check != "off":
                self._post(op, True, self._header(op.specs, fold, tag), _TAG_HEADER, works)
            for t in ts:
                self._post(op, True, t, _TAG_PAYLOAD, works)
            op.nbytes = sum(t.numel() * t.element_size() for t in ts)
        st = self._sends
        with st.cv:
            st.inflight += op.nbytes
        q = self._queues[dst]
        if q is None:
            q = self._queues[dst] = queue.SimpleQueue()
            threading.Thread(target=_complete_sends, args=(q, st), daemon=True,
                             name=f"helix-send-completion-{self.rank}to{dst}").start()
        q.put(op)
        self.stats.sent_messages += 1
        self.stats.sent_bytes += op.nbytes
        return SendHandle(self, op)

    def recv(self, specs: Sequence[Any], src: int, *, fold: int, tag: str = "") -> RecvHandle:
        """Post the receive of one message from ``src`` now, into fresh buffers allocated
        from ``specs`` (``(shape, dtype)`` pairs, or objects with ``.shape``/``.dtype``) on
        this transport's device; filed under ``fold``."""
        if self._failed is not None or self._sends.error is not None:
            self._alive()
        if src == self.rank or not 0 <= src < self.world_size:
            self._check_peer(src)
        specs = [norm_spec(s) for s in specs]
        self._recv_seq[src] += 1
        op = _Op(_RECV, src, fold, tag, self._recv_seq[src], specs)
        handle = RecvHandle(self, op)
        op.handle = handle
        self._file(op)
        dev = self.device
        works: list[Any] = []
        op.works = works
        if self.pack:
            offsets, total = packed_layout(specs, self.check != "off")
            buf = torch.empty(total, dtype=torch.uint8, device=dev)
            op.packed, op.offsets = buf, offsets
            op.keep = [buf]
            if self.check != "off":
                op.expected_hdr = self._header(specs, fold, tag)
            self._post(op, False, buf, _TAG_PAYLOAD, works)
            op.nbytes = total
        else:
            op.keep = [torch.empty(shape, dtype=dtype, device=dev) for shape, dtype in specs]
            if self.check != "off":
                op.expected_hdr = self._header(specs, fold, tag)
                op.hdr_buf = torch.empty(HEADER_WORDS, dtype=torch.int64, device=dev)
                hdr_works: list[Any] = []
                self._post(op, False, op.hdr_buf, _TAG_HEADER, hdr_works)
                op.hdr_work = hdr_works[0]
            for b in op.keep:
                self._post(op, False, b, _TAG_PAYLOAD, works)
            op.nbytes = sum(nbytes(shape, dtype) for shape, dtype in specs)
        self.stats.recv_messages += 1
        self.stats.recv_bytes += op.nbytes
        return handle

    def wait_fold(self, fold: int, timeout: float | None = None) -> None:
        """Wait for every send and receive filed under ``fold`` so far. Requests of other
        folds are neither waited for nor needed."""
        ops = self._pending.get(fold)
        if not ops:
            return
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for op in ops:
            self._complete(op, deadline)
        # only now: after a failure the requests stay referenced
        del self._pending[fold]
        self.release_sent()

    def drain(self, timeout: float | None = None) -> None:
        """Wait for all pending requests of all folds (end of an iteration)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for fold in sorted(self._pending):
            for op in self._pending[fold]:
                self._complete(op, deadline)
            del self._pending[fold]
        self.release_sent()

    def pending(self, fold: int | None = None) -> int:
        """How many posted requests (of ``fold``, or of all folds) have not completed (sends)
        or not been waited for (receives)."""
        lists = [self._pending.get(fold, [])] if fold is not None else self._pending.values()
        return sum(1 for ops in lists for op in ops if op.state == _PENDING)

    def inflight_send_bytes(self) -> int:
        """Bytes of posted sends that have not completed (the transport still references
        their tensors)."""
        return self._sends.inflight

    def release_sent(self) -> int:
        """Drop the references to the tensors of every send completed so far (on this, the
        calling thread); returns how many sends were released."""
        done = self._sends.completed
        n = 0
        while done:
            op = done.popleft()
            op.works = op.keep = None
            n += 1
        return n

    def abort(self, reason: str) -> None:
        """Record ``reason`` for the other ranks (see :func:`report_failure`) and make this
        transport unusable. Exiting the process is what unblocks peers that wait on it."""
        report_failure(f"{self.who}: {reason}", store=self._store)
        if self._failed is None:
            self._failed = RuntimeFailure(f"{self.who}: transport aborted: {reason}",
                                          rank=self.rank)

    def close(self) -> None:
        """Stop the completion threads once they have handled what was posted (called on
        garbage collection; the transport stays usable for receives and collectives)."""
        for i, q in enumerate(self._queues):
            if q is not None:
                q.put(None)
                self._queues[i] = None

    # ---------------------------------------------------------------- collectives
    # Each is bounded by ``timeout`` (not the process group's timeout) and raises a
    # RuntimeFailure naming the collective, this rank and the timeout. ``what`` names the
    # purpose in errors (e.g. "loss broadcast").

    def barrier(self, *, what: str = "") -> None:
        opts = BarrierOptions()
        opts.timeout = self._td()
        self._collective("barrier", what, lambda: self._pg.barrier(opts))

    def broadcast_(self, tensor: torch.Tensor, src: int, *, what: str = "") -> torch.Tensor:
        """In place: ``tensor`` of group rank ``src`` on every rank."""
        self._check_rank(src, "src")
        opts = BroadcastOptions()
        opts.rootRank, opts.rootTensor, opts.timeout = src, 0, self._td()
        self._collective(f"broadcast from rank {src}", what,
                         lambda: self._pg.broadcast([tensor], opts))
        return tensor

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum", *, what: str = "") -> torch.Tensor:
        """In place reduction over all ranks of the group (``op``: sum, max, min)."""
        opts = AllreduceOptions()
        opts.reduceOp = {"sum": ReduceOp.SUM, "max": ReduceOp.MAX, "min": ReduceOp.MIN}[op]
        opts.timeout = self._td()
        self._collective(f"all_reduce ({op})", what, lambda: self._pg.allreduce([tensor], opts))
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor, op: str = "sum", *, what: str = "") -> CollectiveHandle:
        """Start an in-place reduction over all ranks of the group and return at once;
        ``handle.wait()`` completes it, bounded by ``timeout`` from the start (so a reduction
        overlapped with other work costs only the wait that is left)."""
        opts = AllreduceOptions()
        opts.reduceOp = {"sum": ReduceOp.SUM, "max": ReduceOp.MAX, "min": ReduceOp.MIN}[op]
        opts.timeout = self._td()
        return CollectiveHandle(self, *self._launch(f"all_reduce ({op})", what,
                                                    lambda: self._pg.allreduce([tensor], opts)))

    def all_gather_into_async(self, out: torch.Tensor, tensor: torch.Tensor, *, what: str = "") -> CollectiveHandle:
        """Start gathering every rank's ``tensor`` (same numel everywhere) into ``out`` (world
        size times as long, rank-major) and return at once; ``handle.wait()`` is bounded by
        ``timeout`` from the start."""
        opts = AllgatherOptions()
        opts.timeout = self._td()
        return CollectiveHandle(self, *self._launch("all_gather_into_tensor", what,
                                                    lambda: self._pg._allgather_base(out, tensor, opts)))

    def reduce_scatter_async(self, out: torch.Tensor, tensor: torch.Tensor, *, what: str = "") -> CollectiveHandle:
        """Start a sum of ``tensor`` (world size times ``out``'s numel, rank-major) over the
        ranks, rank r keeping part r in ``out``; ``handle.wait()`` is bounded by ``timeout``
        from the start."""
        opts = ReduceScatterOptions()
        opts.reduceOp = ReduceOp.SUM
        opts.timeout = self._td()
        return CollectiveHandle(self, *self._launch("reduce_scatter_tensor (sum)", what,
                                                    lambda: self._pg._reduce_scatter_base(out, tensor, opts)))

    def all_gather_(self, tensor: torch.Tensor, *, what: str = "") -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype everywhere), indexed by group rank."""
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        opts = AllgatherOptions()
        opts.timeout = self._td()
        self._collective("all_gather", what, lambda: self._pg.allgather([out], [tensor], opts))
        return out

    def gather_objects(self, obj: Any, dst: int = 0, *, what: str = "") -> list[Any] | None:
        """Every rank's picklable ``obj`` on group rank ``dst`` (indexed by rank), None
        elsewhere: an all_gather of sizes, then a gather of the pickled bytes."""
        self._check_rank(dst, "dst")
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = self.all_gather_(torch.tensor([data.numel()], dtype=torch.int64),
                                 what=what or "gather_objects sizes")
        n = max(int(s.item()) for s in sizes)
        buf = torch.zeros(n, dtype=torch.uint8)
        buf[:data.numel()] = data
        outs = [torch.empty(n, dtype=torch.uint8) for _ in range(self.world_size)]
        opts = GatherOptions()
        opts.rootRank, opts.timeout = dst, self._td()
        self._collective(f"gather to rank {dst}", what,
                         lambda: self._pg.gather([outs] if self.rank == dst else [], [buf], opts))
        if self.rank != dst:
            return None
        return [pickle.loads(o[:int(s.item())].numpy().tobytes()) for o, s in zip(outs, sizes, strict=True)]

    def gather_all_objects(self, obj: Any, *, what: str = "") -> list[Any]:
        """Every rank's picklable ``obj`` on every rank (two bounded all_gathers)."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = self.all_gather_(torch.tensor([data.numel()], dtype=torch.int64), what=what)
        n = max(int(s.item()) for s in sizes)
        buf = torch.zeros(n, dtype=torch.uint8)
        buf[:data.numel()] = data
        outs = self.all_gather_(buf, what=what)
        return [pickle.loads(o[:int(s.item())].numpy().tobytes()) for o, s in zip(outs, sizes, strict=True)]

    def _td(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout)

    def _collective(self, name: str, what: str, start: Callable[[], Any]) -> None:
        self._complete_collective(*self._launch(name, what, start))

    def _launch(self, name: str, what: str, start: Callable[[], Any]) -> tuple[Any, str, float]:
        if self._failed is not None or self._sends.error is not None:
            self._alive()
        self._ncoll += 1
        t0 = time.monotonic()
        label = f"#{self._ncoll} {name}{f' ({what})' if what else ''}"
        try:
            return start(), label, t0
        except RuntimeError as e:
            raise self._collective_failure(e, label, t0) from e

    def _complete_collective(self, work: Any, label: str, t0: float) -> None:
        """Wait for a started collective, at most until ``timeout`` after its start."""
        t_wait = time.monotonic()
        try:
            left = max(self.timeout - (t_wait - t0), 1e-3)
            if work.wait(datetime.timedelta(seconds=left)) is False:
                raise RuntimeError(f"Timed out after {self.timeout:g} s")
        except RuntimeError as e:
            raise self._collective_failure(e, label, t0) from e
        finally:
            self.stats.wait_s += time.monotonic() - t_wait

    def _collective_failure(self, e: RuntimeError, label: str, t0: float) -> RuntimeFailure:
        text = _first_line(e)
        waited = time.monotonic() - t0
        if _is_timeout(text) or waited >= self.timeout * 0.99:
            cause = (f"timed out after {waited:.2f} s (transport timeout {self.timeout:g} s):"
                     f" some rank of the group never joined it (hung, dead, or running a "
                     f"different program)")
        else:
            cause = f"failed after {waited:.2f} s: a rank of the group closed its connection" \
                    f" or the backend raised"
        msg = (f"{self.who}: collective {label} over {self.world_size} ranks {cause}. "
               f"Backend said: {text}")
        msg += failures.reports_text(self._store)
        exc = RuntimeFailure(msg, rank=self.rank, waiting_for=label)
        self._mark_failed(exc)
        return exc

    # ---------------------------------------------------------------- posting

    def _post(self, op: _Op, is_send: bool, t: torch.Tensor, tag: int, works: list[Any]) -> None:
        try:
            works.append(self._pg.send([t], op.peer, tag) if is_send
                         else self._pg.recv([t], op.peer, tag))
        except RuntimeError as e:  # the pair is already closed (peer gone)
            raise self._fail(op, e, time.monotonic(), posting=True) from e

    def _file(self, op: _Op) -> None:
        ops = self._pending.get(op.fold)
        if ops is None:
            self._pending[op.fold] = [op]
            return
        ops.append(op)
        if len(ops) >= self._compact_at.get(op.fold, 256):
            # drop requests already completed; the next compaction happens at twice the
            # surviving length (amortized O(1) per request)
            ops[:] = [o for o in ops if o.state != _DONE]
            self._compact_at[op.fold] = max(256, 2 * len(ops))

    def _header(self, specs: Sequence[Spec], fold: int, tag: str) -> torch.Tensor:
        key = (fold, tag, *specs)
        hdr = self._hdr_cache.get(key)
        if hdr is None:
            if len(self._hdr_cache) > 16384:
                self._hdr_cache.clear()
            hdr = torch.tensor(build_header(specs, fold, tag), dtype=torch.int64,
                               device=self.device)
            self._hdr_cache[key] = hdr
        return hdr

    # ---------------------------------------------------------------- completion

    def _complete(self, op: _Op, deadline: float) -> None:
        if op.kind == _SEND:
            self._wait_send(op, deadline)
        else:
            self._complete_recv(op, deadline)

    def _wait_send(self, op: _Op, deadline: float) -> None:
        if op.state == _DONE:
            self.release_sent()
            return
        st = self._sends
        t0 = time.monotonic()
        with st.cv:
            st.waiters += 1
            try:
                while op.state == _PENDING and st.error is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    st.cv.wait(remaining)
            finally:
                st.waiters -= 1
        self.stats.wait_s += time.monotonic() - t0
        if op.state == _DONE:
            self.release_sent()
            return
        if st.error is not None:
            self._alive()
        raise self._fail(op, RuntimeError("Timed out waiting for the send to complete"), t0)

    def _complete_recv(self, op: _Op, deadline: float) -> None:
        if op.state == _DONE:
            return
        if self._failed is not None or self._sends.error is not None:
            self._alive()
        t0 = time.monotonic()
        try:
            if op.hdr_work is not None:
                self._wait(op.hdr_work, op, deadline, t0, "its header")
                op.hdr_work = None
                if not torch.equal(op.hdr_buf, op.expected_hdr):
                    raise self._mismatch(op, op.hdr_buf)
            for w in op.works or ():
                self._wait(w, op, deadline, t0, "")
            if op.packed is not None:
                buf = op.packed
                if op.expected_hdr is not None:
                    got = buf[:HEADER_BYTES].view(torch.int64)
                    if not torch.equal(got, op.expected_hdr):
                        raise self._mismatch(op, got)
                result = [buf[off:off + nbytes(shape, dtype)].view(dtype).view(shape)
                          for (shape, dtype), off in zip(op.specs, op.offsets, strict=True)]
            else:
                result = op.keep
        finally:
            self.stats.wait_s += time.monotonic() - t0
        op.state = _DONE
        if op.handle is not None:
            op.handle._result = result
            op.handle = None
        op.works = op.keep = op.hdr_buf = op.packed = None

    def _wait(self, work: Any, op: _Op, deadline: float, t0: float, part: str) -> None:
        try:
            if self._blocking_wait:
                remaining = max(deadline - time.monotonic(), 0.001)
                if work.wait(datetime.timedelta(seconds=remaining)) is False:
                    raise RuntimeError(f"Timed out waiting {remaining * 1e3:.0f}ms")
            else:
                work.wait()
        except RuntimeError as e:
            raise self._fail(op, e, t0, part=part) from e

    # ---------------------------------------------------------------- failures

    def _alive(self) -> None:
        if self._failed is None and self._sends.error is not None:
            op, err, t0 = self._sends.error
            raise self._fail(op, err, t0)  # the first report of a failed send: as it is
        f = self._failed
        if f is not None:
            raise RuntimeFailure(
                f"{self.who}: the transport is unusable after an earlier failure: {f}",
                rank=self.rank, peer=f.peer, fold=f.fold, waiting_for=f.waiting_for, tag=f.tag)

    def _check_peer(self, peer: int) -> None:
        if not (0 <= peer < self.world_size) or peer == self.rank:
            raise ValueError(f"{self.who}: peer={peer} must be another rank of the group "
                             f"(0..{self.world_size - 1}, not {self.rank})")

    def _check_rank(self, r: int, name: str) -> None:
        if not 0 <= r < self.world_size:
            raise ValueError(f"{self.who}: {name}={r} must be a rank of the group "
                             f"(0..{self.world_size - 1})")

    def _fail(self, op: _Op, err: BaseException, t0: float, *, part: str = "",
              posting: bool = False) -> RuntimeFailure:
        text = _first_line(err)
        waited = time.monotonic() - t0
        during = f" while waiting for {part}" if part else ""
        other_side = "receive" if op.kind == _SEND else "send"
        if posting:
            head = "could not be posted"
            cause = (f"the connection to rank {op.peer} is already broken (that rank failed, "
                     f"exited or timed out earlier)")
        elif _is_timeout(text):
            head = (f"timed out after {waited:.2f} s{during} (transport timeout "
                    f"{self.timeout:g} s)")
            cause = (f"rank {op.peer} never completed its side: it may be hung, busy elsewhere, "
                     f"or its program does not post the matching {other_side}")
        elif any(s in text.lower() for s in ("closed", "reset", "broken pipe", "connection",
                                             "socket")):
            head = f"failed after {waited:.2f} s{during}"
            cause = f"rank {op.peer} closed its connection (it crashed, raised or exited)"
        else:
            head = f"failed after {waited:.2f} s{during}"
            cause = "the backend raised"
        what = op.describe()
        msg = f"{self.who}: {what} {head}: {cause}. Backend said: {text}"
        msg += failures.reports_text(self._store)
        exc = RuntimeFailure(msg, rank=self.rank, peer=op.peer, fold=op.fold, tag=op.tag,
                             waiting_for=what + (f", {part}" if part else ""))
        self._mark_failed(exc)
        return exc

    def _mismatch(self, op: _Op, hdr: torch.Tensor) -> RuntimeFailure:
        got = parse_header(hdr.tolist())
        expected = f"{fmt_specs(op.specs)}, fold {op.fold}, tag {op.tag!r}"
        msg = (f"{self.who}: message #{op.seq} from rank {op.peer} does not match the "
               f"receive posted for it: expected {expected}; rank {op.peer} sent "
               f"{got.describe()}. Both ranks must post matching send/receive pairs in the "
               f"same order per (src, dst) pair with the same shapes, dtypes, fold and tag.")
        exc = RuntimeFailure(msg, rank=self.rank, peer=op.peer, fold=op.fold, tag=op.tag,
                             waiting_for=op.describe())
        self._mark_failed(exc)
        return exc

    def _mark_failed(self, exc: RuntimeFailure) -> None:
        if self._failed is None:
            self._failed = exc
            report_failure(f"{self.who}: RuntimeFailure: {str(exc).splitlines()[0]}",
                           store=self._store)

    def __del__(self) -> None:
        try:
            self.close()
            pending = getattr(self, "_pending", None)
            if pending and any(op.state == _PENDING for ops in pending.values() for op in ops):
                _GRAVEYARD.append(pending)
                if getattr(self, "_failed", None) is None:
                    log.warning("rank %s: a Transport with pending requests was garbage "
                                "collected without drain(); their buffers are kept alive",
                                getattr(self, "rank", "?"))
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


def _first_line(err: BaseException) -> str:
    s = str(err).strip()
    return s.splitlines()[0] if s else type(err).__name__


def _is_timeout(text: str) -> bool:
    low = text.lower()
    return "timed out" in low or "timeout" in low
