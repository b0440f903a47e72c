"""Point-to-point transport of the runtime. The only module of the package that imports
``torch.distributed``.

One :class:`Transport` per rank, over the default process group (or a given one):

* ``send(tensors, dst, fold=f, tag=...)`` posts an asynchronous send and keeps the
  tensors alive until it completes;
* ``recv(specs, src, fold=f, tag=...)`` posts the receive at once, into buffers freshly
  allocated from the given ``(shape, dtype)`` specs, and returns a :class:`RecvHandle`
  whose ``wait()`` returns the tensors;
* ``exchange(send_tensors, recv_specs, peer, fold=f)`` is HelixPipe's pairwise call (rule 4
  of HELIXPIPE.md section 2.1): send X to the peer and post the receive of the next input
  from the same peer, in one batch;
* ``wait_fold(f)`` waits only for fold ``f``'s pending sends and receives (rule 3): it never
  waits on a request filed under another fold; ``drain()`` waits for everything.

Matching. Messages between one (src, dst) pair match in FIFO order: the k-th message ``src``
sends to ``dst`` lands in the k-th receive ``dst`` posts from ``src``, whatever the folds.
(gloo matches per (pair, tag) in order; NCCL orders per pair and ignores tags; both give
FIFO because every payload uses the same tag.) Waiting order is free: a rank may post fold
1's receive, then fold 0's, and wait fold 0 first. The receiver must post its receives in
the order the sender sends; the schedule validator guarantees that offline.

Header check (``check=``, env ``HELIX_TRANSPORT_CHECK``). Each message carries a 512-byte
header (magic, tensor count, shapes, dtypes, fold, tag) as a small separate message; the
receiver compares it with what it posted and raises :class:`RuntimeFailure` naming the
expected and actual shapes, dtypes, fold and tag. So the receiver must post with the same
fold and tag as the sender (tags default to ""); a tag such as "fwd seg3 m5" then makes a
FIFO slip show up as "expected 'fwd seg3 m5', got 'fwd seg3 m4'". Headers are built once
per distinct (shapes, dtypes, fold, tag) and cached.

* ``"header"`` (default on gloo): catches any mismatch of shape, dtype, tensor count, fold
  or tag where the sent tensor is not larger than the posted buffer. gloo itself aborts the
  *receiving process* (C++ ``terminate``, no Python error) when a message is larger than
  the posted buffer; peers then see that rank close its connection. Use ``"strict"`` to
  debug such a case.
* ``"strict"``: the receiver posts only the header at ``recv()`` and posts the payload after
  checking it, inside ``wait()``. Catches everything, but the payload only starts moving
  when the receiver waits (gloo is rendezvous based), so it removes compute/communication
  overlap: a debugging mode. Sender side is identical to ``"header"``.
* ``"off"`` (default on NCCL, where reading a header would synchronize the GPU): no
  header; all ranks must use ``"off"`` together.

Measured on the 2-core CPU machine (benchmarks/transport_latency.py, BENCHMARKS.md): the
header costs tens of microseconds per message, which disappears against the milliseconds
of the activations of a realistic micro batch.

Packing (``pack=True``): all tensors of a message (and the header) are copied into one
byte buffer and sent as one message; the receiver gets views into one buffer. It saves
per-message latency for several small tensors and costs a copy on the sender; see the
benchmark for when it helps. All ranks must use the same setting.

Failures and timeouts. Every wait has a deadline (``timeout`` seconds, default 60, env
``HELIX_TRANSPORT_TIMEOUT``). On gloo the wait blocks in ``work.wait(timeout)``: gloo's
p2p works never report completion before ``wait`` (``is_completed()`` stays False), and a
timed-out wait closes the pair, so a poll loop is not possible without a helper thread per
wait (which would add a thread hand-off to every message on two cores). What makes
failures prompt instead:

* a rank that dies or raises closes its sockets when its process exits; gloo then fails
  every peer waiting on it at once ("connection closed"), which raises RuntimeFailure there,
  and those ranks exit in turn: the failure cascades through the pipeline in milliseconds
  (``spawn_ranks`` exits a failing child immediately; torchrun's workers exit on an
  uncaught exception);
* a rank that hangs or keeps running without sending is caught by the timeout;
* a failing rank records ``"rank r: ExcType: message"`` in the process group's store
  (:func:`report_failure`, called by ``spawn_ranks``, by the excepthook that
  :func:`install_failure_excepthook` installs, and by a Transport that fails); every
  RuntimeFailure quotes the reports found there, so the message on rank 0 names the
  rank that failed first and why.

Lifetime. A posted gloo request whose Work and buffer are freed before it completes
corrupts the pair's matching (later messages on it never arrive). Requests therefore stay
referenced until they are waited for, also after a failure, and a Transport garbage
collected with pending requests hands them to a module-level list for the life of the
process (with a warning).

On NCCL, ``wait`` only orders the current CUDA stream after the transfer (no CPU block);
timeouts are then enforced by NCCL's watchdog with the process group timeout, which
``init_from_env`` sets from the same ``timeout``.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import RuntimeFailure

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "RecvHandle",
    "Transport",
    "TransportStats",
    "connect_store",
    "host_store",
    "init_group",
    "install_failure_excepthook",
    "report_failure",
    "reported_failures",
]

DEFAULT_TIMEOUT_S = 60.0
ENV_TIMEOUT = "HELIX_TRANSPORT_TIMEOUT"
ENV_CHECK = "HELIX_TRANSPORT_CHECK"
CHECK_MODES = ("off", "header", "strict")

# Header layout: HEADER_WORDS int64 words.
HEADER_WORDS = 64
HEADER_BYTES = HEADER_WORDS * 8
_MAGIC = 0x48454C4958_5031  # "HELIXP1"
_W_MAGIC, _W_COUNT, _W_FOLD, _W_TAGCRC, _W_BYTES, _W_NDESC, _W_FLAGS = range(7)
_DESC_START, _DESC_END = 8, 48  # per tensor: dtype code, ndim, dims...
_TAG_START = _DESC_END  # words 48..63: the tag's first 128 UTF-8 bytes
_TAG_BYTES = (HEADER_WORDS - _TAG_START) * 8
_FLAG_TRUNCATED = 1

_TAG_PAYLOAD = 0  # gloo tag (slot) of payload messages
_TAG_HEADER = 1  # gloo tag of header messages (separate slot: headers match headers)

_ALIGN = 64  # byte alignment of each tensor inside a packed buffer

_DTYPES = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
)
_DTYPE_CODE = {d: i + 1 for i, d in enumerate(_DTYPES)}

_FAILURE_PREFIX = "helix_transport_failure"

# Requests of failed or garbage-collected transports. A posted gloo request whose Work (and
# buffer) is freed before it completes corrupts the pair's matching state (later messages
# then never arrive), so such requests are kept referenced for the life of the process.
_GRAVEYARD: list[Any] = []

Spec = tuple[tuple[int, ...], torch.dtype]


def _dtype_code(dtype: torch.dtype) -> int:
    code = _DTYPE_CODE.get(dtype)
    if code is None:
        code = 1000 + zlib.crc32(str(dtype).encode())
    return code


def _dtype_from_code(code: int) -> str:
    for d in _DTYPES:
        if _DTYPE_CODE[d] == code:
            return str(d).replace("torch.", "")
    for name in dir(torch):
        d = getattr(torch, name)
        if isinstance(d, torch.dtype) and _dtype_code(d) == code:
            return str(d).replace("torch.", "")
    return f"dtype#{code}"


def _norm_spec(spec: Any) -> Spec:
    """``(shape, dtype)`` or anything with ``.shape`` and ``.dtype`` (a tensor, a FakeTensor,
    a spec dataclass) -> ``(tuple_of_ints, dtype)``."""
    if type(spec) is tuple and len(spec) == 2 and isinstance(spec[1], torch.dtype):
        shape, dtype = spec
    else:
        try:
            shape, dtype = spec.shape, spec.dtype
        except AttributeError:
            raise TypeError(
                f"a receive spec must be (shape, dtype) or have .shape and .dtype; got {spec!r}"
            ) from None
    return tuple(map(int, shape)), dtype


def _fmt_specs(specs: Sequence[Spec]) -> str:
    parts = [f"{tuple(shape)} {str(dtype).replace('torch.', '')}" for shape, dtype in specs]
    n = len(specs)
    return f"{n} tensor{'s' if n != 1 else ''} [{', '.join(parts)}]"


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def _build_header(specs: Sequence[Spec], fold: int, tag: str) -> list[int]:
    words = [0] * HEADER_WORDS
    tag_bytes = tag.encode("utf-8")
    desc: list[int] = []
    total = 0
    for shape, dtype in specs:
        desc += [_dtype_code(dtype), len(shape), *shape]
        total += _nbytes(shape, dtype)
    words[_W_MAGIC] = _MAGIC
    words[_W_COUNT] = len(specs)
    words[_W_FOLD] = fold
    words[_W_TAGCRC] = zlib.crc32(tag_bytes)
    words[_W_BYTES] = total
    words[_W_NDESC] = len(desc)
    room = _DESC_END - _DESC_START
    if len(desc) > room:
        words[_W_FLAGS] |= _FLAG_TRUNCATED
    words[_DESC_START:_DESC_START + min(room, len(desc))] = desc[:room]
    padded = tag_bytes[:_TAG_BYTES].ljust(_TAG_BYTES, b"\0")
    for i in range(HEADER_WORDS - _TAG_START):
        words[_TAG_START + i] = int.from_bytes(padded[8 * i:8 * i + 8], "little", signed=True)
    return words


@dataclass
class _ParsedHeader:
    valid: bool
    specs: list[tuple[tuple[int, ...], str]]
    truncated: bool
    fold: int
    tag: str
    nbytes: int

    def describe(self) -> str:
        if not self.valid:
            return "something that is not a transport header (the message streams are out of step, " \
                   "or the sender runs with HELIX_TRANSPORT_CHECK=off)"
        parts = [f"{shape} {dtype}" for shape, dtype in self.specs]
        more = ", ..." if self.truncated else ""
        n = len(self.specs) if not self.truncated else f">={len(self.specs)}"
        return f"{n} tensors [{', '.join(parts)}{more}] ({self.nbytes} bytes), fold {self.fold}, tag {self.tag!r}"


def _parse_header(words: list[int]) -> _ParsedHeader:
    if words[_W_MAGIC] != _MAGIC:
        return _ParsedHeader(False, [], False, -1, "", 0)
    desc = words[_DESC_START:_DESC_START + min(words[_W_NDESC], _DESC_END - _DESC_START)]
    specs = []
    i = 0
    while i + 1 < len(desc) and len(specs) < words[_W_COUNT]:
        code, ndim = desc[i], desc[i + 1]
        if i + 2 + ndim > len(desc):
            break
        specs.append((tuple(desc[i + 2:i + 2 + ndim]), _dtype_from_code(code)))
        i += 2 + ndim
    raw = b"".join(int(w).to_bytes(8, "little", signed=True) for w in words[_TAG_START:])
    tag = raw.rstrip(b"\0").decode("utf-8", errors="replace")
    truncated = bool(words[_W_FLAGS] & _FLAG_TRUNCATED) or len(specs) < words[_W_COUNT]
    return _ParsedHeader(True, specs, truncated, words[_W_FOLD], tag, words[_W_BYTES])


def _packed_layout(specs: Sequence[Spec], with_header: bool) -> tuple[list[int], int]:
    """Byte offsets of each tensor in a packed buffer and its total size (deterministic, so
    sender and receiver agree from the shapes alone)."""
    off = HEADER_BYTES if with_header else 0
    offsets = []
    for shape, dtype in specs:
        off = (off + _ALIGN - 1) // _ALIGN * _ALIGN
        offsets.append(off)
        off += _nbytes(shape, dtype)
    return offsets, off


# --------------------------------------------------------------------------------------
# failure reports through the process group's store


def _store_of(group: Any = None) -> Any:
    try:
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        return dist.distributed_c10d._world.pg_map[pg][1]
    except Exception:  # noqa: BLE001 - best effort: no store, no reports
        return None


def report_failure(reason: str, group: Any = None, store: Any = None) -> None:
    """Record ``reason`` (e.g. ``"rank 2: ValueError: ..."``) in the store shared by the
    ranks, so that every other rank's RuntimeFailure can quote it. Best effort: never
    raises, returns quickly when the store is gone."""
    store = store if store is not None else _store_of(group)
    if store is None:
        return
    try:
        n = store.add(f"{_FAILURE_PREFIX}/count", 1)
        store.set(f"{_FAILURE_PREFIX}/{n}", reason[:4000])
    except Exception:  # noqa: BLE001
        log.debug("could not record failure in the store", exc_info=True)


def reported_failures(group: Any = None, store: Any = None, limit: int = 8) -> list[str]:
    """The failure reports recorded so far, first one first (empty if none or no store)."""
    store = store if store is not None else _store_of(group)
    if store is None:
        return []
    out = []
    try:
        n = store.add(f"{_FAILURE_PREFIX}/count", 0)
        for i in range(1, min(n, limit) + 1):
            key = f"{_FAILURE_PREFIX}/{i}"
            if store.check([key]):
                out.append(store.get(key).decode("utf-8", errors="replace"))
    except Exception:  # noqa: BLE001
        log.debug("could not read failure reports from the store", exc_info=True)
    return out


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
            rank = dist.get_rank() if dist.is_initialized() else -1
            report_failure(f"rank {rank}: {tp.__name__}: {value}", group)
        except Exception:  # noqa: BLE001
            pass
        previous(tp, value, tb)

    sys.excepthook = hook
    _HOOK_INSTALLED = True


# --------------------------------------------------------------------------------------
# process group helpers used by launch.py (which must not import torch.distributed)


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


# --------------------------------------------------------------------------------------


@dataclass
class TransportStats:
    """Counters of one Transport (cheap; for timelines and benchmarks)."""

    sent_messages: int = 0
    sent_bytes: int = 0
    recv_messages: int = 0
    recv_bytes: int = 0
    wait_s: float = 0.0  # wall time spent inside waits


_PENDING, _DONE = 0, 1
_SEND, _RECV = "send", "receive"


class _Op:
    __slots__ = ("kind", "peer", "fold", "tag", "seq", "specs", "works", "keep", "hdr_work",
                 "hdr_buf", "expected_hdr", "packed", "offsets", "state", "handle", "posted_at")

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
        self.posted_at = time.monotonic()

    def describe(self) -> str:
        direction = "to" if self.kind == _SEND else "from"
        return (f"{self.kind} of {_fmt_specs(self.specs)} {direction} rank {self.peer} "
                f"(fold {self.fold}, tag {self.tag!r}, message #{self.seq} {direction} that rank)")


class RecvHandle:
    """A posted receive. ``wait()`` returns the received tensors (same order as the specs);
    it is idempotent, and returns at once after ``wait_fold(fold)`` has completed it."""

    __slots__ = ("_transport", "_op", "_result")

    def __init__(self, transport: Transport, op: _Op) -> None:
        self._transport = transport
        self._op = op
        self._result: list[torch.Tensor] | None = None

    def wait(self, timeout: float | None = None) -> list[torch.Tensor]:
        if self._result is None:
            t = self._transport
            deadline = time.monotonic() + (t.timeout if timeout is None else timeout)
            t._complete(self._op, deadline)
            assert self._result is not None
        return self._result

    @property
    def done(self) -> bool:
        """True once the data has been waited for (never polls the backend)."""
        return self._result is not None

    @property
    def peer(self) -> int:
        return self._op.peer

    @property
    def fold(self) -> int:
        return self._op.fold

    @property
    def tag(self) -> str:
        return self._op.tag

    @property
    def specs(self) -> list[Spec]:
        return list(self._op.specs)

    def __repr__(self) -> str:
        state = "done" if self.done else "pending"
        return f"RecvHandle({self._op.describe()}, {state})"


class Transport:
    """Point-to-point messages between the ranks of one process group (see the module
    docstring for matching, fold, header and failure semantics).

    Ranks are ranks *of the group*. Not thread-safe: use one Transport from one thread.

    Args:
        group: the process group (default: the default group).
        timeout: seconds each wait may take before it raises RuntimeFailure
            (default ``$HELIX_TRANSPORT_TIMEOUT`` or 60).
        check: ``"header"``, ``"strict"`` or ``"off"`` (default ``$HELIX_TRANSPORT_CHECK``,
            else ``"header"`` on gloo and ``"off"`` on NCCL). Same value on all ranks, except
            that ``"header"`` and ``"strict"`` interoperate.
        pack: send all tensors of a message as one buffer (same value on all ranks).
        device: where receive buffers are allocated (default: CPU on gloo, the current CUDA
            device otherwise).
        batched: post through ``dist.batch_isend_irecv`` (default: on for NCCL and other
            backends; off for gloo, where it is only a loop over isend/irecv with more Python
            per message, so the process group is called directly).
    """

    def __init__(self, group: Any = None, *, timeout: float | None = None,
                 check: str | None = None, pack: bool = False,
                 device: torch.device | str | None = None, batched: bool | None = None) -> None:
        if not is_initialized():
            raise RuntimeFailure(
                "Transport needs an initialized process group: call "
                "helix_compiler.runtime.launch.init_from_env() under torchrun, or run the "
                "function through spawn_ranks()")
        self.group = group
        self._pg = group if group is not None else dist.distributed_c10d._get_default_group()
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
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
        if pack and check == "strict":
            raise ValueError("pack=True carries the header inside the packed buffer, so it "
                             "cannot be combined with check='strict'; use check='header'")
        self.check = check
        self.pack = bool(pack)
        if device is None:
            device = torch.device("cpu") if self.backend == "gloo" else torch.device(
                "cuda", torch.cuda.current_device())
        self.device = torch.device(device)
        # gloo: call the process group directly (batch_isend_irecv only loops over
        # isend/irecv there, with more Python on the way); others: batch_isend_irecv.
        self._direct = (self.backend == "gloo") if batched is None else not batched
        self._blocking_wait = self.backend == "gloo" or self.device.type == "cpu"
        self._pending: dict[int, list[_Op]] = {}
        self._sent_seq = [0] * self.world_size
        self._recv_seq = [0] * self.world_size
        self._unposted: list[list[_Op]] = [[] for _ in range(self.world_size)]  # strict mode
        self._hdr_cache: dict[Any, torch.Tensor] = {}
        self._compact_at: dict[int, int] = {}
        self._batch: list[tuple[_Op, Any]] | None = None
        self._failed: RuntimeFailure | None = None
        self._store = _store_of(group)
        self.stats = TransportStats()
        if self.backend != "gloo":
            # batched P2P may only involve a subset of ranks once the group has run a
            # collective with everyone (see torch.distributed.batch_isend_irecv).
            dist.barrier(group=group)

    # ---------------------------------------------------------------- public API

    def send(self, tensors: Sequence[torch.Tensor], dst: int, *, fold: int,
             tag: str = "") -> None:
        """Post an asynchronous send of ``tensors`` (one message) to ``dst``, filed under
        ``fold``. The tensors are kept alive until ``wait_fold(fold)`` / ``drain()``; do not
        modify them in place before that."""
        if self._failed is not None:
            self._alive()
        if dst == self.rank or not 0 <= dst < self.world_size:
            self._check_peer(dst)
        if self._direct:
            self._post_send(list(tensors), dst, fold, tag)
            return
        self._batch = []
        try:
            self._post_send(list(tensors), dst, fold, tag)
        finally:
            self._flush()

    def recv(self, specs: Sequence[Any], src: int, *, fold: int, tag: str = "") -> RecvHandle:
        """Post the receive of one message from ``src`` now, into fresh buffers allocated
        from ``specs`` (``(shape, dtype)`` pairs, or objects with ``.shape``/``.dtype``) on
        this transport's device; filed under ``fold``."""
        if self._failed is not None:
            self._alive()
        if src == self.rank or not 0 <= src < self.world_size:
            self._check_peer(src)
        specs = [_norm_spec(s) for s in specs]
        if self._direct:
            return self._post_recv(specs, src, fold, tag)
        self._batch = []
        try:
            return self._post_recv(specs, src, fold, tag)
        finally:
            self._flush()

    def exchange(self, send_tensors: Sequence[torch.Tensor] | None,
                 recv_specs: Sequence[Any] | None, peer: int, *, fold: int, tag: str = "",
                 recv_tag: str | None = None) -> RecvHandle | None:
        """HelixPipe's pairwise call: post the receive of the next input from ``peer`` and
        send ``send_tensors`` to ``peer``, as one batch, both filed under ``fold``. Either
        side may be None (the edges of the schedule). ``tag`` names the sent message and
        ``recv_tag`` (default: ``tag``) the received one. Returns the receive's handle."""
        self._alive()
        self._check_peer(peer)
        self._batch = None if self._direct else []
        try:
            handle = None
            if recv_specs is not None:
                handle = self._post_recv([_norm_spec(s) for s in recv_specs], peer, fold,
                                         tag if recv_tag is None else recv_tag)
            if send_tensors is not None:
                self._post_send(list(send_tensors), peer, fold, tag)
        finally:
            self._flush()
        return handle

    def wait_fold(self, fold: int, timeout: float | None = None) -> None:
        """Wait for every send and receive filed under ``fold`` so far (posting order).
        Requests of other folds are neither waited for nor needed."""
        ops = self._pending.get(fold)
        if not ops:
            return
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for op in ops:
            self._complete(op, deadline)
        # only now: after a failure the requests stay referenced, so no buffer that the
        # backend may still write into is freed
        del self._pending[fold]

    def drain(self, timeout: float | None = None) -> None:
        """Wait for all pending requests of all folds (end of an iteration)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for fold in sorted(self._pending):
            for op in self._pending[fold]:
                self._complete(op, deadline)
            del self._pending[fold]

    # Collectives the pipeline needs at step boundaries (loss broadcast, tied-weight gradients).
    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        dist.broadcast(tensor, src=src, group=self.group)
        return tensor

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over all ranks of the group."""
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def gather_objects(self, obj: Any, dst: int = 0) -> list[Any] | None:
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst, group=self.group)
        return out

    def pending(self, fold: int | None = None) -> int:
        """How many posted requests (of ``fold``, or of all folds) were not waited for."""
        lists = [self._pending.get(fold, [])] if fold is not None else self._pending.values()
        return sum(1 for ops in lists for op in ops if op.state == _PENDING)

    def abort(self, reason: str) -> None:
        """Record ``reason`` for the other ranks (see :func:`report_failure`) and make this
        transport unusable. Exiting the process is what unblocks peers that wait on it."""
        report_failure(f"rank {self.rank}: {reason}", store=self._store)
        if self._failed is None:
            self._failed = RuntimeFailure(f"rank {self.rank}: transport aborted: {reason}",
                                          rank=self.rank)

    # ---------------------------------------------------------------- posting

    def _post_send(self, tensors: list[torch.Tensor], dst: int, fold: int, tag: str) -> None:
        ts = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        self._sent_seq[dst] += 1
        op = _Op(_SEND, dst, fold, tag, self._sent_seq[dst],
                 [(tuple(t.shape), t.dtype) for t in ts])
        self._file(op)  # filed first: whatever is posted stays referenced, even on failure
        if self.pack:
            offsets, total = _packed_layout(op.specs, self.check != "off")
            buf = torch.empty(total, dtype=torch.uint8, device=self.device)
            if self.check != "off":
                buf[:HEADER_BYTES].view(torch.int64).copy_(self._header(op.specs, fold, tag))
            for t, off in zip(ts, offsets, strict=True):
                n = t.numel() * t.element_size()
                if n:
                    buf[off:off + n].copy_(t.reshape(-1).view(torch.uint8))
            op.keep = [buf]
            self._enqueue(op, True, buf, dst, _TAG_PAYLOAD)
            nbytes = total
        else:
            op.keep = ts
            if self.check != "off":
                hdr = self._header(op.specs, fold, tag)
                op.keep = [hdr, *ts]
                self._enqueue(op, True, hdr, dst, _TAG_HEADER)
            nbytes = 0
            for t in ts:
                self._enqueue(op, True, t, dst, _TAG_PAYLOAD)
                nbytes += t.numel() * t.element_size()
        self.stats.sent_messages += 1
        self.stats.sent_bytes += nbytes

    def _post_recv(self, specs: list[Spec], src: int, fold: int, tag: str) -> RecvHandle:
        self._recv_seq[src] += 1
        op = _Op(_RECV, src, fold, tag, self._recv_seq[src], specs)
        handle = RecvHandle(self, op)
        op.handle = handle
        self._file(op)  # filed first: whatever is posted stays referenced, even on failure
        dev = self.device
        if self.pack:
            offsets, total = _packed_layout(specs, self.check != "off")
            buf = torch.empty(total, dtype=torch.uint8, device=dev)
            op.packed, op.offsets = buf, offsets
            op.keep = [buf]
            if self.check != "off":
                op.expected_hdr = self._header(specs, fold, tag)
            self._enqueue(op, False, buf, src, _TAG_PAYLOAD)
            self.stats.recv_bytes += total
        else:
            op.keep = [torch.empty(shape, dtype=dtype, device=dev) for shape, dtype in specs]
            if self.check != "off":
                op.expected_hdr = self._header(specs, fold, tag)
                op.hdr_buf = torch.empty(HEADER_WORDS, dtype=torch.int64, device=dev)
                self._enqueue(op, False, op.hdr_buf, src, _TAG_HEADER, header=True)
            if self.check != "strict":
                for b in op.keep:
                    self._enqueue(op, False, b, src, _TAG_PAYLOAD)
            else:
                self._unposted[src].append(op)
            self.stats.recv_bytes += sum(_nbytes(shape, dtype) for shape, dtype in specs)
        self.stats.recv_messages += 1
        return handle

    def _enqueue(self, op: _Op, is_send: bool, t: torch.Tensor, peer: int, tag: int,
                 header: bool = False) -> None:
        if self._direct:
            try:
                work = self._pg.send([t], peer, tag) if is_send else self._pg.recv([t], peer, tag)
            except RuntimeError as e:  # the pair is already closed (peer gone)
                raise self._fail(op, e, time.monotonic(), posting=True) from e
            self._attach(op, work, header)
        else:
            assert self._batch is not None
            p2p = dist.P2POp(dist.isend if is_send else dist.irecv, t,
                             group=self.group, tag=tag, group_peer=peer)
            self._batch.append((op, p2p, header))

    def _attach(self, op: _Op, work: Any, header: bool) -> None:
        if header:
            op.hdr_work = work
        elif op.works is None:
            op.works = [work]
        else:
            op.works.append(work)

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        if not batch:
            return
        try:
            works = dist.batch_isend_irecv([p2p for _, p2p, _ in batch])
        except RuntimeError as e:
            raise self._fail(batch[0][0], e, time.monotonic(), posting=True) from e
        if len(works) == len(batch):
            for (op, _, header), w in zip(batch, works, strict=True):
                self._attach(op, w, header)
        else:  # coalesced into fewer works: every op waits for all of them
            for op, _, header in batch:
                for w in works:
                    self._attach(op, w, header)

    def _file(self, op: _Op) -> None:
        ops = self._pending.get(op.fold)
        if ops is None:
            self._pending[op.fold] = [op]
            return
        ops.append(op)
        if len(ops) >= self._compact_at.get(op.fold, 256):
            # drop requests already completed through their handles; the next compaction
            # happens at twice the surviving length (amortized O(1) per request)
            ops[:] = [o for o in ops if o.state == _PENDING]
            self._compact_at[op.fold] = max(256, 2 * len(ops))

    def _header(self, specs: Sequence[Spec], fold: int, tag: str) -> torch.Tensor:
        key = (fold, tag, *specs)
        hdr = self._hdr_cache.get(key)
        if hdr is None:
            if len(self._hdr_cache) > 16384:
                self._hdr_cache.clear()
            hdr = torch.tensor(_build_header(specs, fold, tag), dtype=torch.int64,
                               device=self.device)
            self._hdr_cache[key] = hdr
        return hdr

    # ---------------------------------------------------------------- completion

    def _complete(self, op: _Op, deadline: float) -> None:
        if op.state == _DONE:
            return
        if self._failed is not None:
            self._alive()
        t0 = time.monotonic()
        try:
            if op.kind == _RECV and op.hdr_work is not None:
                self._wait(op.hdr_work, op, deadline, t0, "its header")
                op.hdr_work = None
                if not torch.equal(op.hdr_buf, op.expected_hdr):
                    raise self._mismatch(op, op.hdr_buf)
                if self.check == "strict":
                    self._post_strict_payloads(op, deadline, t0)
            for w in op.works or ():
                self._wait(w, op, deadline, t0, "")
            if op.packed is not None:
                buf = op.packed
                if op.expected_hdr is not None:
                    got = buf[:HEADER_BYTES].view(torch.int64)
                    if not torch.equal(got, op.expected_hdr):
                        raise self._mismatch(op, got)
                result = [buf[off:off + _nbytes(shape, dtype)].view(dtype).view(shape)
                          for (shape, dtype), off in zip(op.specs, op.offsets, strict=True)]
            else:
                result = op.keep
        finally:
            self.stats.wait_s += time.monotonic() - t0
        op.state = _DONE
        if op.handle is not None:
            op.handle._result = result
            op.handle = None
        op.works = op.keep = op.hdr_work = op.hdr_buf = op.packed = None

    def _post_strict_payloads(self, op: _Op, deadline: float, t0: float) -> None:
        """Strict mode: post the payload receives from ``op.peer`` up to and including
        ``op``, in posting order, so that payloads still match FIFO when folds are waited
        out of order. The headers of earlier requests from that peer were sent before
        ``op``'s, so they have already arrived: checking them does not wait on other folds'
        payloads."""
        queue = self._unposted[op.peer]
        while op in queue:
            first = queue.pop(0)
            if first is not op:
                self._wait(first.hdr_work, first, deadline, t0, "its header")
                if not torch.equal(first.hdr_buf, first.expected_hdr):
                    raise self._mismatch(first, first.hdr_buf)
                first.hdr_work = None  # checked
            if first.specs:
                self._batch = None if self._direct else []
                try:
                    for b in first.keep:
                        self._enqueue(first, False, b, first.peer, _TAG_PAYLOAD)
                finally:
                    self._flush()

    def _wait(self, work: Any, op: _Op, deadline: float, t0: float, part: str) -> None:
        try:
            if self._blocking_wait:
                remaining = max(deadline - time.monotonic(), 0.001)
                ok = work.wait(datetime.timedelta(seconds=remaining))
                if ok is False:
                    raise RuntimeError(f"Timed out waiting {remaining * 1e3:.0f}ms")
            else:
                work.wait()
        except RuntimeError as e:
            raise self._fail(op, e, t0, part=part) from e

    # ---------------------------------------------------------------- failures

    def _alive(self) -> None:
        if self._failed is not None:
            f = self._failed
            raise RuntimeFailure(
                f"rank {self.rank}: the transport is unusable after an earlier failure: {f}",
                rank=self.rank, peer=f.peer, fold=f.fold, waiting_for=f.waiting_for)

    def _check_peer(self, peer: int) -> None:
        if not (0 <= peer < self.world_size) or peer == self.rank:
            raise ValueError(f"rank {self.rank}: peer={peer} must be another rank of the group "
                             f"(0..{self.world_size - 1}, not {self.rank})")

    def _fail(self, op: _Op, err: BaseException, t0: float, *, part: str = "",
              posting: bool = False) -> RuntimeFailure:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        low = text.lower()
        waited = time.monotonic() - t0
        during = f" while waiting for {part}" if part else ""
        other_side = "receive" if op.kind == _SEND else "send"
        if posting:
            head = "could not be posted"
            cause = (f"the connection to rank {op.peer} is already broken (that rank failed, "
                     f"exited or timed out earlier)")
        elif "timed out" in low or "timeout" in low:
            head = (f"timed out after {waited:.2f} s{during} (transport timeout "
                    f"{self.timeout:g} s)")
            cause = (f"rank {op.peer} never completed its side: it may be hung, busy elsewhere, "
                     f"or its program does not post the matching {other_side}")
        elif any(s in low for s in ("closed", "reset", "broken pipe", "connection", "socket")):
            head = f"failed after {waited:.2f} s{during}"
            cause = f"rank {op.peer} closed its connection (it crashed, raised or exited)"
        else:
            head = f"failed after {waited:.2f} s{during}"
            cause = "the backend raised"
        what = op.describe()
        msg = f"rank {self.rank}: {what} {head}: {cause}. Backend said: {text}"
        reports = reported_failures(store=self._store)
        if reports:
            msg += ("\nFailures reported by ranks so far (the first is the likely root cause):"
                    "\n  " + "\n  ".join(reports))
        exc = RuntimeFailure(msg, rank=self.rank, peer=op.peer, fold=op.fold,
                             waiting_for=what + (f", {part}" if part else ""))
        self._mark_failed(exc)
        return exc

    def _mismatch(self, op: _Op, hdr: torch.Tensor) -> RuntimeFailure:
        got = _parse_header(hdr.tolist())
        expected = f"{_fmt_specs(op.specs)}, fold {op.fold}, tag {op.tag!r}"
        msg = (f"rank {self.rank}: message #{op.seq} from rank {op.peer} does not match the "
               f"receive posted for it: expected {expected}; rank {op.peer} sent "
               f"{got.describe()}. Both ranks must post matching send/receive pairs in the "
               f"same order per (src, dst) pair with the same shapes, dtypes, fold and tag.")
        exc = RuntimeFailure(msg, rank=self.rank, peer=op.peer, fold=op.fold,
                             waiting_for=op.describe())
        self._mark_failed(exc)
        return exc

    def __del__(self) -> None:
        try:
            pending = getattr(self, "_pending", None)
            if pending and any(op.state == _PENDING for ops in pending.values() for op in ops):
                _GRAVEYARD.append(pending)
                if getattr(self, "_failed", None) is None:
                    log.warning("rank %s: a Transport with pending requests was garbage "
                                "collected without drain(); their buffers are kept alive",
                                getattr(self, "rank", "?"))
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass

    def _mark_failed(self, exc: RuntimeFailure) -> None:
        if self._failed is None:
            self._failed = exc
            report_failure(f"rank {self.rank}: RuntimeFailure: {str(exc).splitlines()[0]}",
                           store=self._store)
