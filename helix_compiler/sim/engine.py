"""Discrete-event simulation of a schedule's per-rank programs.

Model:

* one compute stream per rank, running its compute instructions (F, B, I, W, R) in program
  order, each for its duration;
* communication is asynchronous and overlaps compute: a ``SEND`` costs the sender no compute
  time; the message leaves when the sender's outgoing link (one per rank for peers on the same
  node, one for peers on other nodes) is free, occupies it for ``bytes / bandwidth`` and
  arrives ``latency`` later; messages match FIFO per (src, dst) pair. A send is a rendezvous
  (gloo and NCCL point-to-point are): it completes, and the receiver has the data, no sooner
  than ``bytes / bandwidth`` (+ ``latency`` for the arrival) after the receiver posted the
  matching receive;
* a ``RECV`` is where a rank waits: its compute stream idles until the message has arrived;
* memory (activations only, no parameters / optimizer state / kernel workspaces): a forward's
  stash (``saved_bytes`` of the policy) from the end of ``F`` to the end of its ``B`` (the
  runtime's backward releases it, and the gradient it consumed, as autograd runs; to the
  stash's ``FREE`` after an ``I``, to the end of ``W`` without frees); a recompute adds what
  it rematerializes until then; a boundary value a rank holds (its own output, what of it is
  new memory there, or a received message) counts until the consumer's forward starts (it
  then lives on in the consumer's stash, whose ``saved_bytes`` include the inputs) or, when
  sent, until its ``FREE`` and the send's completion; a gradient from its production /
  arrival until its ``B`` or ``FREE`` (or until it was sent) and the send's completion.
  ``SimResult.memory_after`` samples that memory after every instruction in program order, as
  ``runtime.profiling.instruction_memory`` samples a real run.

Every rank's timeline is exact given the durations: a rank only waits at RECVs, the send time
of a message only depends on the sender and its arrival on that and the receiver's own post,
so the simulation processes ranks in any order and repeats until all programs are done.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..cost.devices import DeviceSpec, get_device
from ..errors import ScheduleError
from ..ir.schedule import RECV_LOOKAHEAD, Instr, Schedule
from ..ir.segment import SegmentCost, SegmentSpec
from .costs import OpTimes, op_times


@dataclass(frozen=True)
class OpEvent:
    rank: int
    start: float
    end: float
    instr: Instr
    category: str  # fwd, fwd_attn, bwd, bwd_attn, bwd_input, bwd_weight, recompute, head, embed


@dataclass(frozen=True)
class MessageEvent:
    src: int
    dst: int
    send_time: float  # when the SEND was issued
    start: float  # when the link started carrying it
    arrival: float
    nbytes: float
    instr: Instr  # the SEND


@dataclass
class SimResult:
    schedule: Schedule
    iteration_time: float
    busy: list[float]
    events: list[OpEvent]
    messages: list[MessageEvent]
    memory_timeline: list[list[tuple[float, float]]]  # per rank: (time, bytes after the change)
    peak_stash_bytes: list[float]
    tokens_per_iteration: float = 0.0
    device_name: str = ""
    meta: dict = field(default_factory=dict)
    # per rank: bytes after each instruction of its program, in program order
    memory_after: list[list[float]] = field(default_factory=list)

    # ------------------------------------------------------------------ metrics
    @property
    def num_stages(self) -> int:
        return self.schedule.num_stages

    @property
    def idle(self) -> list[float]:
        return [self.iteration_time - b for b in self.busy]

    @property
    def bubble_ratio(self) -> float:
        """Idle fraction of all ranks: ``1 - sum(busy) / (p * iteration_time)``."""
        if self.iteration_time <= 0:
            return 0.0
        return sum(self.iteration_time - b for b in self.busy) / (self.num_stages * self.iteration_time)

    @property
    def bubble_time(self) -> float:
        """Iteration time minus the busiest rank's compute time."""
        return self.iteration_time - max(self.busy)

    @property
    def peak_memory_bytes(self) -> list[float]:
        return [max((b for _, b in tl), default=0.0) for tl in self.memory_timeline]

    @property
    def rank_memory(self) -> list | None:
        """Per rank ``sim.memory.RankMemory`` (activations + parameters + gradients + optimizer
        state) when the result came from ``HelixProgram.simulate`` (or the schedule search);
        None for a bare schedule simulation, which knows no parameters."""
        return self.meta.get("rank_memory")

    @property
    def total_peak_memory_bytes(self) -> list[float] | None:
        """Per rank total peak bytes (see :attr:`rank_memory`), or None."""
        mem = self.rank_memory
        return None if mem is None else [m.total for m in mem]

    def memory_warnings(self, memory_bytes: float | None = None) -> list[str]:
        """One line per rank whose peak memory exceeds ``memory_bytes`` (default: the simulated
        device's memory; none when it is unknown, i.e. not > 0 or infinite): the total of
        :attr:`rank_memory` when known, else activations only (parameters, gradients and
        optimizer state would come on top)."""
        limit = self.meta.get("device_memory_bytes") if memory_bytes is None else memory_bytes
        if limit is None or not 0 < limit < math.inf:
            return []
        if self.rank_memory is not None:
            return [f"rank {r}: peak memory {m.describe()} would exceed the {self.device_name or 'device'}'s "
                    f"{limit / 1e9:.3f} GB of memory"
                    for r, m in enumerate(self.rank_memory) if m.total > limit]
        return [f"rank {r}: peak activations {peak / 1e9:.3f} GB exceed the {self.device_name or 'device'}'s "
                f"{limit / 1e9:.3f} GB of memory (before parameters, gradients and optimizer state)"
                for r, peak in enumerate(self.peak_memory_bytes) if peak > limit]

    @property
    def comm_bytes(self) -> float:
        return sum(m.nbytes for m in self.messages)

    @property
    def comm_bytes_per_rank(self) -> list[float]:
        out = [0.0] * self.num_stages
        for m in self.messages:
            out[m.src] += m.nbytes
        return out

    @property
    def throughput(self) -> float:
        """Tokens per second (``num_microbatches * micro_batch_size * seq_len / time``)."""
        return self.tokens_per_iteration / self.iteration_time if self.iteration_time else 0.0

    def summary(self) -> str:
        gb = 1e9
        lines = [f"{self.schedule.kind}: p={self.num_stages} M={self.schedule.num_microbatches} "
                 f"F={self.schedule.num_folds} on {self.device_name or '?'}",
                 f"  iteration {self.iteration_time:.6g} s, bubble ratio {self.bubble_ratio:.4f}, "
                 f"comm {self.comm_bytes / gb:.3f} GB in {len(self.messages)} messages"]
        for r in range(self.num_stages):
            lines.append(f"  rank {r}: busy {self.busy[r]:.6g} s, idle {self.idle[r]:.6g} s, "
                         f"peak activations {self.peak_memory_bytes[r] / gb:.3f} GB")
            if self.rank_memory is not None:
                lines.append(f"          peak memory {self.rank_memory[r].describe()}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ outputs
    def write_timeline(self, path, *, title: str | None = None, show_labels: bool | None = None):
        from .plot import write_timeline

        return write_timeline(self, path, title=title, show_labels=show_labels)

    def write_memory_plot(self, path):
        from .plot import write_memory_plot

        return write_memory_plot(self, path)

    def write_chrome_trace(self, path):
        from .trace import write_chrome_trace

        return write_chrome_trace(self, path)


def _category(instr: Instr, kind: str) -> str:
    if instr.op == "R":
        return "recompute"
    if kind in ("head", "embed"):
        return kind
    attn = kind == "attn"
    if instr.op == "F":
        return "fwd_attn" if attn else "fwd"
    if instr.op == "B":
        return "bwd_attn" if attn else "bwd"
    if instr.op == "I":
        return "bwd_attn" if attn else "bwd_input"
    return "bwd_weight"


def simulate_times(schedule: Schedule, times: OpTimes, *,
                   link: Callable[[int, int], tuple[float, float]] | None = None,
                   tokens_per_iteration: float = 0.0, device_name: str = "",
                   recv_lookahead: int = RECV_LOOKAHEAD) -> SimResult:
    """Simulate with explicit per-segment numbers. ``link(src, dst) -> (bytes/s, latency s)``
    (default: infinitely fast, zero latency). A schedule without communication instructions
    (a compute-only order) gets them inserted first. A receive buffer exists from its post,
    ``recv_lookahead`` RECVs before the rank waits on it (as the runtime posts them)."""
    n_seg = len(schedule.specs)
    if len(times.fwd) != n_seg:
        raise ScheduleError(f"OpTimes has {len(times.fwd)} segments, the schedule's chain has "
                            f"{n_seg}")
    if "comm" not in schedule.lowered:  # compute-only order: add its messages first
        from ..lowering.comm import insert_communication

        schedule = insert_communication(schedule)
    link = link or (lambda s, d: (math.inf, 0.0))
    p = schedule.num_stages
    idx = schedule.seg_index
    kinds = [s.kind for s in schedule.specs]
    last = n_seg - 1
    has_frees = "frees" in schedule.lowered
    progs = [prog.instrs for prog in schedule.programs]
    pcs = [0] * p
    clock = [0.0] * p
    busy = [0.0] * p
    egress: dict[tuple[int, bool], float] = defaultdict(float)
    queues: dict[tuple[int, int], deque] = defaultdict(deque)
    events: list[OpEvent] = []
    messages: list[MessageEvent] = []
    mem_deltas: list[list[tuple[float, float, int]]] = [[] for _ in range(p)]  # (time, bytes, instr)
    stash: list[dict[tuple[int, int], float]] = [dict() for _ in range(p)]
    stash_only: list[list[tuple[float, float]]] = [[] for _ in range(p)]
    # boundary buffers: key (value, c, m) -> [bytes, release-not-before time, local, sends], sends:
    # the rendezvous ((src, dst), message ordinal, transfer seconds) its release also waits for
    bufs: list[dict[tuple[str, int, int], list]] = [dict() for _ in range(p)]
    ends: list[list[float]] = [[] for _ in range(p)]  # per instruction: the rank's clock after it
    posts: dict[tuple[int, int], list[float]] = defaultdict(list)  # (src, dst) -> post time per message
    post_time: list[dict[int, float]] = [dict() for _ in range(p)]  # RECV position -> its post time
    sent: dict[tuple[int, int], int] = defaultdict(int)  # (src, dst) -> messages sent so far
    held_sends: list[tuple[int, float, float, list, int]] = []  # released once every post is known

    def mem(r: int, t: float, delta: float, is_stash: bool = False, k: int | None = None) -> None:
        if delta:
            mem_deltas[r].append((t, delta, pcs[r] if k is None else k))
            if is_stash:
                stash_only[r].append((t, delta))

    def add_buf(r: int, key, t: float, *, local: bool = False) -> None:
        # a forward's own outputs: only what is not its inputs, stash or parameters is new memory
        c = key[1]
        nbytes = times.local_out_bytes[c] if local and key[0] == "fwd" and times.local_out_bytes \
            else times.out_bytes[c]
        bufs[r][key] = [nbytes, t, local, []]
        mem(r, t, nbytes)

    fresh = {(r, k) for r, ins in enumerate(progs) for k in _fresh_forwards(ins)}
    # forwards that run under autograd (no R for them): the runtime's stash keeps their outputs
    grad_forwards = {(r, idx[i.seg], i.mb) for r, ins in enumerate(progs) for i in ins if i.op == "F"} - {
        (r, idx[i.seg], i.mb) for r, ins in enumerate(progs) for i in ins if i.op == "R"}
    # receives posted ahead: each rank's RECVs in order; posted[r] = how many are posted
    recvs = [[k for k, i in enumerate(ins) if i.op == "RECV"] for ins in progs]
    recv_ordinal = [{k: n for n, k in enumerate(rs)} for rs in recvs]
    posted = [0] * p

    def post_receives(r: int, upto: int, t: float) -> None:
        while posted[r] < min(upto + 1, len(recvs[r])):
            k = recvs[r][posted[r]]
            i = progs[r][k]
            mem(r, t, times.out_bytes[idx[i.seg]])
            posts[(i.peer, r)].append(t)
            post_time[r][k] = t
            posted[r] += 1

    def drop_buf(r: int, key, t: float) -> None:
        b = bufs[r].pop(key, None)
        if b is None:
            return
        value, c, m = key
        if value == "fwd" and (r, c, m) in grad_forwards and (c, m) in stash[r]:
            stash[r][(c, m)] += b[0]  # its autograd graph still holds the output until B
            mem(r, max(t, b[1]), -b[0])
            mem(r, max(t, b[1]), b[0], True)
            return
        if b[3]:  # sent: held until the receivers have posted (known once the simulation ends)
            held_sends.append((r, b[0], max(t, b[1]), b[3], pcs[r]))
            return
        mem(r, max(t, b[1]), -b[0])

    def drop_stash(r: int, key, t: float) -> None:
        nbytes = stash[r].pop(key, 0.0)
        mem(r, t, -nbytes, True)

    total = sum(len(x) for x in progs)
    executed = 0
    while executed < total:
        progressed = False
        for r in range(p):
            ins = progs[r]
            while pcs[r] < len(ins):
                i = ins[pcs[r]]
                c = idx[i.seg]
                t = clock[r]
                if i.op == "RECV":
                    post_receives(r, recv_ordinal[r][pcs[r]] + recv_lookahead, t)
                    q = queues[(i.peer, r)]
                    if not q:
                        break
                    key, arrival, tx, lat, n_msg = q.popleft()
                    if key != (i.value, c, i.mb):
                        raise ScheduleError(f"simulate: rank {r} '{i}' got message {key}; "
                                            "run validate_schedule first")
                    arrival = max(arrival, post_time[r][pcs[r]] + tx + lat)  # rendezvous
                    messages[n_msg] = dataclasses.replace(messages[n_msg], arrival=arrival)
                    clock[r] = max(t, arrival)
                    bufs[r][key] = [times.out_bytes[c], clock[r], False, []]  # its bytes count from the post
                elif i.op == "SEND":
                    nbytes = times.out_bytes[c]
                    bw, lat = link(r, i.peer)
                    lane = (r, _same_node_key(link, r, i.peer))
                    start = max(t, egress[lane])
                    tx = nbytes / bw if bw != math.inf else 0.0
                    egress[lane] = start + tx
                    arrival = start + tx + lat
                    queues[(r, i.peer)].append(((i.value, c, i.mb), arrival, tx, lat, len(messages)))
                    messages.append(MessageEvent(r, i.peer, t, start, arrival, nbytes, i))
                    b = bufs[r].get((i.value, c, i.mb))
                    if b is not None:
                        b[1] = max(b[1], start + tx)
                        b[3].append(((r, i.peer), sent[(r, i.peer)], tx))
                    sent[(r, i.peer)] += 1
                    if b is not None and not has_frees:
                        drop_buf(r, (i.value, c, i.mb), t)
                elif i.op == "FREE":
                    if i.value == "stash":
                        drop_stash(r, (c, i.mb), t)
                    else:
                        drop_buf(r, (i.value, c, i.mb), t)
                else:
                    d = times.duration(i.op, c)
                    end = t + d
                    events.append(OpEvent(r, t, end, i, _category(i, kinds[c])))
                    busy[r] += d
                    clock[r] = end
                    m = i.mb
                    if i.op == "F":
                        local_in = False
                        if c > 0:  # the input moves into this segment's stash
                            bb = bufs[r].get(("fwd", c - 1, m))
                            if bb is not None:
                                bufs[r].pop(("fwd", c - 1, m))
                                mem(r, max(t, bb[1]), -bb[0])
                                local_in = bb[2]
                        # a backward that follows its forward at once has no R: the forward
                        # ran under autograd and keeps what an R would have rebuilt
                        kept = times.saved_bytes[c]
                        if (r, pcs[r]) in fresh:
                            kept = times.graph_bytes[c] if times.graph_bytes else kept + times.recompute_bytes[c]
                        if local_in and times.local_alias:  # inputs that are the producer's stash or weights
                            kept -= times.local_alias[c]
                        stash[r][(c, m)] = kept
                        mem(r, end, kept, True)
                        if c < last:
                            add_buf(r, ("fwd", c, m), end, local=True)
                    elif i.op == "R":  # rebuilds the autograd graph, and the outputs it holds
                        extra = times.recompute_bytes[c]
                        stash[r][(c, m)] = stash[r].get((c, m), 0.0) + extra
                        mem(r, t, extra, True)
                    elif i.op in ("B", "I"):
                        if c > 0:
                            add_buf(r, ("bwd", c - 1, m), end)
                        if c < last and (i.op == "B" or not has_frees):
                            drop_buf(r, ("bwd", c, m), end)
                        if i.op == "B":
                            drop_stash(r, (c, m), end)
                    elif i.op == "W" and not has_frees:
                        drop_stash(r, (c, m), end)
                ends[r].append(clock[r])
                pcs[r] += 1
                executed += 1
                progressed = True
        if not progressed:
            stuck = [f"rank {r} at '{progs[r][pcs[r]]}'" for r in range(p) if pcs[r] < len(progs[r])]
            raise ScheduleError("simulate: the schedule deadlocks (" + "; ".join(stuck)
                                + "); run validate_schedule for the step x rank grid")
    for r, nbytes, t, sends, k in held_sends:
        done = max([t] + [posts[pair][n] + tx for pair, n, tx in sends])
        mem(r, done, -nbytes, k=k)
    T = max(clock) if clock else 0.0
    timelines = []
    peaks_stash = []
    for r in range(p):
        timelines.append(_cumulate([(t, d) for t, d, _ in mem_deltas[r]]))
        peaks_stash.append(max((b for _, b in _cumulate(stash_only[r])), default=0.0))
    return SimResult(schedule=schedule, iteration_time=T, busy=busy, events=events,
                     messages=messages, memory_timeline=timelines, peak_stash_bytes=peaks_stash,
                     tokens_per_iteration=tokens_per_iteration, device_name=device_name,
                     memory_after=[_after_each(mem_deltas[r], ends[r]) for r in range(p)])


def _fresh_forwards(ins) -> list[int]:
    """Positions of forwards whose backward is the rank's next compute instruction (no R in
    between: the lowering inserts none there)."""
    out = []
    for k, i in enumerate(ins):
        if i.op != "F":
            continue
        nxt = next((j for j in ins[k + 1:] if j.is_compute), None)
        if nxt is not None and nxt.op in ("B", "I") and nxt.seg == i.seg and nxt.mb == i.mb:
            out.append(k)
    return out


def _same_node_key(link, src: int, dst: int) -> bool:
    key = getattr(link, "same_node", None)
    return bool(key(src, dst)) if key else False


def _after_each(deltas: list[tuple[float, float, int]], ends: list[float]) -> list[float]:
    """Bytes after each instruction k: the changes made by instructions 0..k that have taken
    effect by its end (a sent buffer's release may come at a later instruction)."""
    by_instr: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for t, d, k in deltas:
        by_instr[k].append((t, d))
    pending: list[tuple[float, float]] = []
    out, cur = [], 0.0
    for k, end in enumerate(ends):
        for td in by_instr.get(k, ()):
            heapq.heappush(pending, td)
        while pending and pending[0][0] <= end:
            cur += heapq.heappop(pending)[1]
        out.append(cur)
    return out


def _cumulate(deltas: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(time, bytes after) with frees before allocations at equal times."""
    out = [(0.0, 0.0)]
    cur = 0.0
    for t, d in sorted(deltas, key=lambda x: (x[0], x[1])):
        cur += d
        if out and out[-1][0] == t:
            out[-1] = (t, cur)
        else:
            out.append((t, cur))
    return out


class Topology:
    """Maps stages to nodes and gives the link between two stages."""

    def __init__(self, device: DeviceSpec, stages_per_node: int = 1):
        if stages_per_node < 1:
            raise ScheduleError(f"stages_per_node={stages_per_node} must be >= 1")
        self.device = device
        self.stages_per_node = stages_per_node

    def same_node(self, src: int, dst: int) -> bool:
        return src // self.stages_per_node == dst // self.stages_per_node

    def __call__(self, src: int, dst: int) -> tuple[float, float]:
        return self.device.link(self.same_node(src, dst))


def simulate(schedule: Schedule, specs: Sequence[SegmentSpec], costs: Sequence[SegmentCost], *,
             device: str | DeviceSpec = "H20", micro_batch_size: int = 1, seq_len: int,
             dtype: str = "bf16", recompute: str | None = None, stages_per_node: int = 1,
             profile=None, recv_lookahead: int = RECV_LOOKAHEAD) -> SimResult:
    """Simulate one training iteration of ``schedule`` with durations from the cost model.

    ``recompute`` defaults to the policy the schedule was lowered with (passing another one is
    an error: the schedule's R instructions were placed for its own policy).
    ``stages_per_node``: consecutive pipeline stages sharing a node (default 1: every stage on
    its own node, the usual layout when pipeline parallelism is the outermost dimension).
    """
    if len(specs) != len(schedule.specs) or [s.name for s in specs] != [
            s.name for s in schedule.specs]:
        raise ScheduleError(f"specs {[s.name for s in specs][:6]}... do not match the schedule's "
                            f"chain of {len(schedule.specs)} segments")
    if len(costs) != len(specs):
        raise ScheduleError(f"got {len(costs)} SegmentCosts for {len(specs)} segments")
    policy = schedule.recompute if recompute is None else recompute
    if policy != schedule.recompute:
        raise ScheduleError(f"simulate(recompute={recompute!r}) but the schedule was lowered with "
                            f"recompute={schedule.recompute!r}; rebuild it with "
                            f"build_schedule(..., recompute={recompute!r})")
    dev = get_device(device, profile=profile)
    times = op_times(costs, dev, micro_batch_size=micro_batch_size, seq_len=seq_len, dtype=dtype,
                     recompute=policy, specs=specs)
    topo = Topology(dev, stages_per_node)
    res = simulate_times(schedule, times, link=topo, recv_lookahead=recv_lookahead,
                         tokens_per_iteration=schedule.num_microbatches * micro_batch_size * seq_len,
                         device_name=dev.name)
    res.meta.update(micro_batch_size=micro_batch_size, seq_len=seq_len, dtype=dtype,
                    stages_per_node=stages_per_node, device_memory_bytes=dev.memory_bytes)
    return res


def unit_times(schedule: Schedule, *, head: float = 0.0) -> OpTimes:
    """Every F/B/I/W one time unit, the head ``head`` units, recompute and comm free: the slot
    model of HELIXPIPE.md 2.4."""
    n = len(schedule.specs)
    one = [1.0] * n
    one[-1] = head
    return OpTimes(fwd=tuple(one), bwd=tuple(one), bwd_input=tuple(one), bwd_weight=tuple(one),
                   recompute=(0.0,) * n, saved_bytes=(0.0,) * n, recompute_bytes=(0.0,) * n,
                   out_bytes=(0.0,) * n)


def slot_grid(schedule: Schedule, *, times: OpTimes | None = None) -> list[list[str]]:
    """The step x rank picture of HELIXPIPE.md 2.4: ``grid[slot][rank]`` is the compute
    instruction running in that slot (``"A1.6"``, ``"b:P8.7"``) or ``""``; zero-duration
    instructions are left out. Default durations: :func:`unit_times`."""
    res = simulate_times(schedule, times or unit_times(schedule))
    T = int(math.ceil(res.iteration_time))
    grid = [[""] * schedule.num_stages for _ in range(T)]
    for e in res.events:
        if e.end > e.start:
            for t in range(int(e.start), int(math.ceil(e.end))):
                grid[t][e.rank] = e.instr.short()
    return grid


def format_slot_grid(grid: Sequence[Sequence[str]]) -> str:
    if not grid:
        return ""
    p = len(grid[0])
    w = max(6, max(len(c) for row in grid for c in row))
    lines = ["slot | " + " | ".join(f"{'stage ' + str(r):<{w}}" for r in range(p))]
    for t, row in enumerate(grid):
        lines.append(f"{t:4d} | " + " | ".join(f"{(c or '-'):<{w}}" for c in row))
    return "\n".join(lines)
