"""The per-rank interpreter of a :class:`~helix_compiler.ir.stage_program.StageProgram`: a
dispatch table over instruction kinds.

It never builds instructions and never rewrites graphs: it runs what lowering produced.
Values are keyed by (segment, micro batch): ``fwd`` holds a segment's outputs (computed here
or received), ``bwd`` the gradients of a segment's outputs, ``stash`` what a forward keeps
for its backward. Every segment runs on detached leaf inputs, so a backward is one
``torch.autograd.backward`` over the segment's outputs and yields the gradients of its
inputs for the previous segment: a local hand-over and a network hop look the same.

Memory is what the schedule says: a buffer lives from the instruction that makes it to its
FREE; a sent buffer stays referenced by the transport until its send has completed (the peer
has posted the receive) and is released at the end of the instruction during which it did.
Randomness: a segment with random ops (dropout) records the RNG state of its forward and
restores it for every rerun (recompute, the head's loss preview), as
``torch.utils.checkpoint`` does, so the gradient is that of the returned loss.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import RuntimeFailure
from ..ir.recompute import part_rule
from ..ir.schedule import RECV_LOOKAHEAD, Instr
from ..ir.stage_program import StageProgram, StageSegment
from ..kernels import attention_replay
from .precision import autocast_off, autocast_region, autocast_state

# hook(instr, start, end): called after every instruction with perf_counter times
InstrHook = Callable[[Instr, float, float], None]


@dataclass
class _Stash:
    inputs: list[torch.Tensor]
    outputs: tuple | None = None
    attention: list | None = None  # recorded (out, lse) for replay
    rng: tuple | None = None  # RNG state the forward ran with (segments with dropout)


@dataclass(frozen=True)
class TraceEvent:
    instr: Instr
    start: float
    end: float


@dataclass
class RankState:
    fwd: dict = field(default_factory=dict)
    bwd: dict = field(default_factory=dict)
    stash: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)  # mb -> loss value (head rank)
    preview_rng: dict = field(default_factory=dict)  # mb -> RNG state of the head's preview

    def clear(self) -> None:
        for d in (self.fwd, self.bwd, self.stash, self.losses, self.preview_rng):
            d.clear()


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replaying_rng(state: tuple | None, device: torch.device):
    """Run with ``state`` as the RNG state, leaving the surrounding stream untouched."""
    if state is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


class Executor:
    def __init__(self, program: StageProgram, *, transport, hooks: Sequence[InstrHook] = (),
                 record_trace: bool = False, recv_lookahead: int = RECV_LOOKAHEAD):
        self.program = program
        self.rank = program.rank
        self.transport = transport
        self.device = getattr(transport, "device", torch.device("cpu"))
        self.hooks = list(hooks)
        self.trace: list[TraceEvent] = []
        # the loss preview of each micro batch (inside the instruction that made the final
        # hidden state available): (start, end), for timing breakdowns
        self.preview_times: dict[int, tuple[float, float]] = {}
        if record_trace:
            self.hooks.append(lambda i, t0, t1: self.trace.append(TraceEvent(i, t0, t1)) if i.is_compute else None)
        self.recomputed = {(i.seg, i.mb): i.part for i in program.instrs if i.op == "R"}
        self.state = RankState()
        self.inputs: list[dict[str, torch.Tensor]] = []
        self.grad_scale = 1.0
        self.loss_divisor = float(program.num_microbatches)  # the step's loss = sum of head outputs / this
        self.training = True
        self.forward_only = False
        self.recv_specs = program.recv_specs  # the step's (other dtypes under autocast)
        self.amp = None  # the step's autocast state, re-entered for its forwards (precision)
        # Receives are posted up to `recv_lookahead` RECVs ahead of the one being waited for, in
        # program order (which keeps the per-pair FIFO order); see ir.schedule.RECV_LOOKAHEAD.
        self.recv_lookahead = recv_lookahead
        self._instrs: tuple[Instr, ...] = program.instrs
        self._recv_at: list[int] = []
        self._recv_pos: dict[int, int] = {}
        self._posted: dict[int, object] = {}
        self._next_post = 0
        # RECV is handled in run(): it posts receives ahead by position in the program
        self.dispatch = {"F": self._forward, "R": self._recompute, "B": self._backward,
                         "SEND": self._send, "FREE": self._free}

    # -------------------------------------------------------------------------------- driving
    def begin(self, inputs: list[dict[str, torch.Tensor]], *, forward_only: bool = False,
              grad_scale: float = 1.0, loss_divisor: float | None = None, recv_specs=None) -> None:
        """Start a step over ``inputs`` (one dict of user inputs per micro batch). The step's
        loss is the sum of the head's outputs over the micro batches divided by
        ``loss_divisor`` (default: the number of micro batches, a mean of means; the step's
        counted tokens when the head returns token sums)."""
        self.state.clear()
        self.trace.clear()
        self.preview_times.clear()
        self.inputs = inputs
        self.grad_scale = grad_scale
        self.loss_divisor = float(self.program.num_microbatches if loss_divisor is None else loss_divisor)
        self.forward_only = forward_only
        self.recv_specs = recv_specs if recv_specs is not None else self.program.recv_specs
        self.amp = autocast_state()
        self._instrs = self.program.forward_only if forward_only else self.program.instrs
        self._recv_at = [k for k, i in enumerate(self._instrs) if i.op == "RECV"]
        self._recv_pos = {k: n for n, k in enumerate(self._recv_at)}
        self._posted.clear()
        self._next_post = 0

    def run(self, start: int, stop: int) -> None:
        instrs = self._instrs
        release_sent = self.transport.release_sent
        for k in range(start, stop):
            instr = instrs[k]
            t0 = time.perf_counter()
            try:
                with torch.profiler.record_function(str(instr)), \
                        (autocast_region(self.amp) if instr.op != "B" else autocast_off()):
                    if instr.op == "RECV":
                        self._receive(k, instr)
                    else:
                        self.dispatch[instr.op](instr)
                    # sends completed by now give their buffers back here, on this thread, so the
                    # memory after an instruction is what the simulator's memory_after says
                    release_sent()
            except Exception as e:
                where = f"instruction {k} '{instr}' (segment {instr.seg}, micro batch {instr.mb})"
                raise RuntimeFailure(f"rank {self.rank} failed at {where}: {type(e).__name__}: {e}",
                                     rank=self.rank, peer=getattr(e, "peer", None),
                                     fold=getattr(e, "fold", instr.fold),
                                     waiting_for=getattr(e, "waiting_for", None) or str(instr)) from e
            t1 = time.perf_counter()
            for hook in self.hooks:
                hook(instr, t0, t1)

    @property
    def num_instrs(self) -> int:
        return len(self._instrs)

    # ---------------------------------------------------------------------------- instructions
    def _gm(self, seg: StageSegment):
        return seg.gm if self.training else seg.eval_gm

    def _call(self, seg: StageSegment, leaves: list, mb: int):
        user = [self.inputs[mb][n] for n in seg.user_inputs]
        return self._gm(seg)(*leaves, *user)

    def _rng(self, seg: StageSegment) -> tuple | None:
        return _rng_state(self.device) if seg.uses_rng and self.training else None

    def _forward(self, i: Instr) -> None:
        seg = self.program.segments[i.seg]
        pred = self.program.pred(i.seg)
        chain_in = self.state.fwd[(pred, i.mb)] if pred is not None else []
        if self.forward_only:  # evaluation: nothing is stashed
            with torch.no_grad(), attention_replay.mode("direct"):
                self._outputs(i, self._call(seg, list(chain_in), i.mb))
            return
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in chain_in]
        part = self.recomputed.get((i.seg, i.mb))
        # the head's real forward reuses the RNG state of the loss preview forward() returned
        replay = self.state.preview_rng.pop(i.mb, None) if i.seg == self.program.head else None
        rng = replay if replay is not None else self._rng(seg)
        rule = part_rule(part)  # what the recompute policy table says this forward keeps
        cache: list = []
        with _replaying_rng(replay, self.device), torch.set_grad_enabled(rule.forward_grad), \
                attention_replay.mode(rule.forward_attention, cache):
            outs = self._call(seg, leaves, i.mb)
        self.state.stash[(i.seg, i.mb)] = (_Stash(leaves, outs, rng=rng) if rule.forward_grad
                                           else _Stash(leaves, None, cache or None, rng=rng))
        self._outputs(i, outs)

    def _outputs(self, i: Instr, outs) -> None:
        if i.seg == self.program.head:  # the loss: nothing in the chain consumes it
            self.state.losses[i.mb] = outs[0].detach().clone()
            return
        self.state.fwd[(i.seg, i.mb)] = [o.detach() for o in outs]
        if i.seg == self.program.final and self.program.preview_loss and not self.forward_only:
            self._preview_loss(i.mb)

    def _preview_loss(self, mb: int) -> None:
        """The head's loss in the forward half (its real forward runs at the start of the
        micro batch's backward, HelixPipe's order): a no-grad pass whose RNG state the real
        forward reuses, so the returned loss is the one differentiated."""
        head = self.program.segments[self.program.head]
        t0 = time.perf_counter()
        rng = self._rng(head)
        if rng is not None:
            self.state.preview_rng[mb] = rng
        with torch.no_grad(), attention_replay.mode("direct"), _replaying_rng(rng, self.device), \
                torch.profiler.record_function(f"preview {self.program.head} m{mb}"):
            (loss,) = self._call(head, self.state.fwd[(self.program.final, mb)], mb)
        self.state.losses[mb] = loss.detach().clone()
        self.preview_times[mb] = (t0, time.perf_counter())

    def _recompute(self, i: Instr) -> None:
        seg = self.program.segments[i.seg]
        st = self.state.stash[(i.seg, i.mb)]
        with torch.enable_grad(), _replaying_rng(st.rng, self.device), \
                attention_replay.mode(part_rule(i.part).recompute_attention, st.attention):
            st.outputs = self._call(seg, st.inputs, i.mb)
        st.attention = None

    def _backward(self, i: Instr) -> None:
        st = self.state.stash.pop((i.seg, i.mb))
        if i.seg == self.program.head:
            grads = [torch.full_like(st.outputs[0], self.grad_scale / self.loss_divisor)]
        else:
            grads = self.state.bwd.pop((i.seg, i.mb))
        outs = [o for o in st.outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        pred = self.program.pred(i.seg)
        if pred is not None:
            self.state.bwd[(pred, i.mb)] = [
                (x.grad if x.grad is not None else torch.zeros_like(x)) for x in st.inputs if x.is_floating_point()]

    def _send(self, i: Instr) -> None:
        store = self.state.fwd if i.value == "fwd" else self.state.bwd
        self.transport.send(store[(i.seg, i.mb)], i.peer, fold=i.fold, tag=f"{i.value} {i.seg} m{i.mb}")

    def _post(self, k: int) -> None:
        i = self._instrs[k]
        specs = self.recv_specs[(i.value, i.seg)]
        self._posted[k] = self.transport.recv(specs, i.peer, fold=i.fold, tag=f"{i.value} {i.seg} m{i.mb}")

    def _receive(self, k: int, i: Instr) -> None:
        # post every receive up to this one and `recv_lookahead` beyond it, in program order
        while self._next_post < len(self._recv_at) and (
                self._recv_at[self._next_post] <= k or self._next_post <= self._recv_pos[k] + self.recv_lookahead):
            self._post(self._recv_at[self._next_post])
            self._next_post += 1
        store = self.state.bwd if i.value == "bwd" else self.state.fwd
        store[(i.seg, i.mb)] = self._posted.pop(k).wait()
        if (i.value == "fwd" and i.seg == self.program.final and self.program.preview_loss
                and not self.forward_only):
            self._preview_loss(i.mb)

    def _free(self, i: Instr) -> None:
        {"stash": self.state.stash, "fwd": self.state.fwd, "bwd": self.state.bwd}[i.value].pop((i.seg, i.mb), None)

    def live_bytes(self) -> int:
        """Bytes of the tensors this rank's buffers hold now (fwd, bwd, stash), counting a
        storage once."""
        seen: set[int] = set()
        total = 0

        def add(t):
            nonlocal total
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()

        for d in (self.state.fwd, self.state.bwd):
            for ts in d.values():
                for t in ts:
                    add(t)
        for st in self.state.stash.values():
            for t in (*st.inputs, *(st.outputs or ()), *(x for pair in (st.attention or ()) for x in pair)):
                add(t)
        return total
