"""The per-rank interpreter: a dispatch table over instruction kinds.

It never builds instructions: it runs a rank's program as the schedule gives it. Values are
keyed by (segment, micro batch): ``fwd`` holds a segment's outputs (computed here or
received), ``bwd`` the gradients of a segment's outputs (computed here by the next segment's
backward, or received), ``stash`` what a forward keeps for its backward. Every segment runs
on detached leaf inputs, so a backward is one ``torch.autograd.backward`` over the segment's
outputs and yields the gradients of its inputs for the previous segment: a local hand-over
and a network hop look the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import sympy
import torch

from ..errors import RuntimeFailure
from ..ir.program import Segment
from ..ir.schedule import Instr, RankProgram
from ..ir.segment import B, S
from . import attention_replay


@dataclass
class _Stash:
    inputs: list[torch.Tensor]
    outputs: tuple | None = None
    attention: list | None = None  # recorded (out, lse) for replay


@dataclass
class TraceEvent:
    op: str
    seg: str
    mb: int
    start: float
    end: float


@dataclass
class RankState:
    fwd: dict = field(default_factory=dict)
    bwd: dict = field(default_factory=dict)
    stash: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)  # mb -> loss value (head rank)


def split_point(program: RankProgram, head: str) -> int:
    """Index of the rank's first backward-half instruction: the first B/I/W/R, backward
    RECV, or forward of the head whose backward follows at once (HelixPipe runs the head at
    the start of a micro batch's backward). Receives of final hidden states stay in the
    forward half: forward() previews the loss from them."""
    instrs = program.instrs
    for k, i in enumerate(instrs):
        head_in_bwd = i.op == "F" and i.seg == head and _next_compute_is_head_backward(instrs, k, head)
        if i.op in ("B", "I", "W", "R") or (i.op == "RECV" and i.value == "bwd") or head_in_bwd:
            return k
    return len(instrs)


def all_forward_first(program: RankProgram, head: str) -> bool:
    """True when no forward (but the head's) comes after the split point: the program splits
    into a forward half and a backward half (helix, GPipe), unlike 1F1B."""
    k = split_point(program, head)
    return not any(i.op == "F" and i.seg != head for i in program.instrs[k:])


def _next_compute_is_head_backward(instrs, k: int, head: str) -> bool:
    for i in instrs[k + 1:]:
        if i.is_compute:
            return i.op == "B" and i.seg == head
    return False


class Executor:
    def __init__(self, rank: int, program: RankProgram, segments: list[Segment], *, transport,
                 micro_batch_size: int, seq_len: int, num_microbatches: int,
                 record_trace: bool = False, recv_lookahead: int = 2):
        self.rank = rank
        self.program = program
        self.segments = {s.name: s for s in segments}
        names = [s.name for s in segments]
        self.pred = dict(zip(names[1:], names[:-1], strict=True))  # chain predecessor of each segment
        self.transport = transport
        self.num_microbatches = num_microbatches
        env = {B: micro_batch_size, S: seq_len}
        self.out_specs = {s.name: [(tuple(int(sympy.sympify(d).subs(env)) for d in shape), dtype)
                                   for shape, dtype in s.output_meta] for s in segments}
        self.recomputed = {(i.seg, i.mb): i.part for i in program if i.op == "R"}
        for seg in segments:
            if seg.spec.kind == "attn":
                attention_replay.install(seg.gm)
        self.head_name = segments[-1].name
        self.final_name = segments[-2].name
        # The head's forward proper may run at the start of a micro batch's backward (HelixPipe:
        # no logits stash); then forward() needs a value-only pass to return the loss. Where
        # the head runs in the forward half (GPipe, 1F1B) it gives the loss itself.
        split = split_point(program, self.head_name)
        self.preview_loss = any(
            i.op == "F" and i.seg == self.head_name for i in program.instrs[split:])
        self.state = RankState()
        self.inputs: list[dict[str, torch.Tensor]] = []
        self.grad_scale = 1.0
        self.record_trace = record_trace
        # Receives are posted up to `recv_lookahead` RECVs ahead of the one being waited for (in
        # program order, which keeps the per-pair FIFO order): gloo moves data only once a
        # receive is posted, so this lets the next input arrive while this rank computes.
        self.recv_lookahead = recv_lookahead
        self._recv_at = [k for k, i in enumerate(program.instrs) if i.op == "RECV"]
        self._recv_pos = {k: n for n, k in enumerate(self._recv_at)}
        self._posted: dict[int, object] = {}
        self._next_post = 0  # index into _recv_at of the next receive to post
        self.trace: list[TraceEvent] = []
        self.dispatch = {"F": self._forward, "R": self._recompute, "B": self._backward,
                         "SEND": self._send, "FREE": self._free,
                         "I": self._unsupported, "W": self._unsupported}

    # -------------------------------------------------------------------------------- driving
    def split_point(self) -> int:
        return split_point(self.program, self.head_name)

    def run(self, start: int, stop: int) -> None:
        instrs = self.program.instrs
        for k in range(start, stop):
            instr = instrs[k]
            t0 = time.perf_counter()
            try:
                if instr.op == "RECV":
                    self._receive(k, instr)
                else:
                    self.dispatch[instr.op](instr)
            except Exception as e:
                raise RuntimeFailure(f"rank {self.rank} failed at instruction {k} '{instr}' "
                                     f"(segment {instr.seg}, micro batch {instr.mb}): {type(e).__name__}: {e}") from e
            if self.record_trace and instr.is_compute:
                self.trace.append(TraceEvent(instr.op, instr.seg, instr.mb, t0, time.perf_counter()))

    # ---------------------------------------------------------------------------- instructions
    def _call(self, seg: Segment, leaves: list, mb: int):
        user = [self.inputs[mb][n] for n in seg.user_inputs]
        return seg.gm(*leaves, *user)

    def _forward(self, i: Instr) -> None:
        seg = self.segments[i.seg]
        pred = self.pred.get(i.seg)
        chain_in = self.state.fwd[(pred, i.mb)] if pred is not None else []
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in chain_in]
        part = self.recomputed.get((i.seg, i.mb))
        if part is None:
            with torch.enable_grad():
                outs = self._call(seg, leaves, i.mb)
            self.state.stash[(i.seg, i.mb)] = _Stash(leaves, outs)
        else:
            cache: list = []
            with torch.no_grad(), attention_replay.mode("record" if part == "pre" else "direct", cache):
                outs = self._call(seg, leaves, i.mb)
            self.state.stash[(i.seg, i.mb)] = _Stash(leaves, None, cache)
        self.state.fwd[(i.seg, i.mb)] = [o.detach() for o in outs]
        if i.seg == self.final_name and self.preview_loss:
            self._preview_loss(i.mb)
        if i.seg == self.head_name:
            self.state.losses[i.mb] = outs[0].detach().clone()

    def _preview_loss(self, mb: int) -> None:
        head = self.segments[self.head_name]
        with torch.no_grad(), attention_replay.mode("direct"):
            (loss,) = self._call(head, self.state.fwd[(self.final_name, mb)], mb)
        self.state.losses[mb] = loss.detach().clone()

    def _recompute(self, i: Instr) -> None:
        seg = self.segments[i.seg]
        st = self.state.stash[(i.seg, i.mb)]
        with torch.enable_grad(), attention_replay.mode("replay" if i.part == "pre" else "direct", st.attention):
            st.outputs = self._call(seg, st.inputs, i.mb)
        st.attention = None

    def _backward(self, i: Instr) -> None:
        st = self.state.stash.pop((i.seg, i.mb))
        if i.seg == self.head_name:
            grads = [torch.full_like(st.outputs[0], self.grad_scale / self.num_microbatches)]
        else:
            grads = self.state.bwd.pop((i.seg, i.mb))
        outs = [o for o in st.outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        pred = self.pred.get(i.seg)
        if pred is not None:
            self.state.bwd[(pred, i.mb)] = [
                (x.grad if x.grad is not None else torch.zeros_like(x)) for x in st.inputs if x.is_floating_point()]

    def _send(self, i: Instr) -> None:
        store = self.state.fwd if i.value == "fwd" else self.state.bwd
        self.transport.send(store[(i.seg, i.mb)], i.peer, fold=i.fold, tag=f"{i.value} {i.seg} m{i.mb}")

    def _post(self, k: int) -> None:
        i = self.program.instrs[k]
        specs = self.out_specs[i.seg]
        if i.value == "bwd":
            specs = [s for s in specs if s[1].is_floating_point]
        self._posted[k] = self.transport.recv(specs, i.peer, fold=i.fold, tag=f"{i.value} {i.seg} m{i.mb}")

    def _receive(self, k: int, i: Instr) -> None:
        # post every receive up to this one and `recv_lookahead` beyond it, in program order
        while self._next_post < len(self._recv_at) and (
                self._recv_at[self._next_post] <= k or self._next_post <= self._recv_pos[k] + self.recv_lookahead):
            self._post(self._recv_at[self._next_post])
            self._next_post += 1
        store = self.state.bwd if i.value == "bwd" else self.state.fwd
        store[(i.seg, i.mb)] = self._posted.pop(k).wait()
        if i.value == "fwd" and i.seg == self.final_name and self.preview_loss:
            self._preview_loss(i.mb)

    def reset(self) -> None:
        """Start a new iteration (the receives of the last one were all consumed)."""
        assert not self._posted, f"rank {self.rank}: {len(self._posted)} receives posted but never consumed"
        self._next_post = 0

    def _free(self, i: Instr) -> None:
        {"stash": self.state.stash, "fwd": self.state.fwd, "bwd": self.state.bwd}[i.value].pop((i.seg, i.mb), None)

    def _unsupported(self, i: Instr) -> None:
        raise RuntimeFailure(f"instruction {i} (split backward) is simulated only; run zb1p in the simulator")
