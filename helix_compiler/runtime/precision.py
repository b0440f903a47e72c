"""Mixed precision: ``torch.autocast`` around ``pipe(...)``.

Under autocast the segments produce other dtypes than at capture (a linear's output is
bf16, a residual add of fp32 and bf16 is fp32), so both sides of every message must agree
on them. ``step_recv_specs`` propagates the whole chain once per autocast configuration on
fake tensors (every rank computes the same table from the same segment graphs, nothing is
sent) and gives this rank's receive specs. The executor re-enters the step's autocast
state for the instructions that run outside the user's region (the head's forward and the
recomputations in the backward half), so the step computes what autocast around the
single-process model computes; backward instructions run without it, as
``loss.backward()`` outside the region does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.fx as fx

from ..kernels import attention_autocast as _attention_autocast  # noqa: F401  (registers its rule)

AMP_DEVICE_TYPES = ("cpu", "cuda")
AutocastState = tuple[tuple[str, torch.dtype], ...]


def autocast_state() -> AutocastState | None:
    """The autocast regions enabled now, ``((device_type, dtype), ...)``, or None."""
    state = tuple((d, torch.get_autocast_dtype(d)) for d in AMP_DEVICE_TYPES if torch.is_autocast_enabled(d))
    return state or None


@contextlib.contextmanager
def autocast_region(state: AutocastState | None):
    """Run under the autocast ``state`` (nothing when None)."""
    with contextlib.ExitStack() as stack:
        for device_type, dtype in state or ():
            stack.enter_context(torch.autocast(device_type, dtype=dtype))
        yield


@contextlib.contextmanager
def autocast_off():
    """Leave every enabled autocast region (backward runs as outside the user's region)."""
    with contextlib.ExitStack() as stack:
        for device_type, _ in autocast_state() or ():
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


class _FakeRun(fx.Interpreter):
    """Runs a segment graph on fake tensors; parameters and buffers become fake tensors of
    their shape and dtype on ``device`` (other ranks' tensors may be meta)."""

    def __init__(self, gm: fx.GraphModule, device: torch.device):
        super().__init__(gm)
        self.device = device

    def get_attr(self, target, args, kwargs):
        t = super().get_attr(target, args, kwargs)
        if isinstance(t, torch.Tensor):
            return torch.empty(t.shape, dtype=t.dtype, device=self.device)
        return t


def chain_specs_under(stages, state: AutocastState, device: torch.device) -> dict[str, tuple]:
    """``segment -> ((shape, dtype), ...)`` of every chain segment's outputs under ``state``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..kernels import attention_replay

    segments = {}
    for st in stages:
        segments.update(st.segments)
    first = stages[0]
    b, s = first.micro_batch_size, first.seq_len
    out: dict[str, tuple] = {}
    with FakeTensorMode(), torch.no_grad(), autocast_region(state), attention_replay.mode("direct"):
        user = {n: torch.zeros((b, s), dtype=torch.int64, device=device) for n in first.input_names}
        carried: list[torch.Tensor] = []
        for name in first.chain:
            seg = segments[name]
            inputs = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in carried]
            outs = _FakeRun(seg.gm, device).run(*inputs, *(user[n] for n in seg.user_inputs))
            carried = [o for o in outs if isinstance(o, torch.Tensor)]
            out[name] = tuple((tuple(int(d) for d in o.shape), o.dtype) for o in carried)
    return out


def step_recv_specs(pipe) -> Mapping | None:
    """This rank's receive specs for the step about to run under the current autocast
    state (cached per state), or None outside autocast (the lowered specs hold)."""
    state = autocast_state()
    if state is None:
        return None
    cache = pipe.__dict__.setdefault("_autocast_recv_specs", {})
    if state not in cache:
        device = torch.device(getattr(pipe.transport, "device", "cpu"))
        outs = chain_specs_under(pipe.stages, state, device)
        cache[state] = {(value, seg): (outs[seg] if value == "fwd" else
                                       tuple(x for x in outs[seg] if x[1].is_floating_point))
                        for value, seg in pipe.stage.recv_specs}
    return cache[state]
