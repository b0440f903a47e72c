"""Mixed precision: ``torch.autocast`` around ``pipe(...)``; parameters in the dtype the model
was compiled in (bf16 parameters: cast the model before ``helix_compile``; fp32 master
weights: ``master_weights``).

Under autocast the segments produce other dtypes than at capture (a linear's output is
bf16, a residual add of fp32 and bf16 is fp32), so both sides of every message must agree
on them. ``step_recv_specs`` propagates the whole chain once per autocast configuration on
fake tensors (every rank computes the same table from the same segment graphs, nothing is
sent) and gives this rank's receive specs. The executor re-enters the step's autocast
state for the instructions that run outside the user's region (the head's forward and the
recomputations in the backward half), so the step computes what autocast around the
single-process model computes; backward instructions run without it, as
``loss.backward()`` outside the region does.

Parameter dtypes are the compiled ones. ``torch.export`` specializes the captured graph on
them: a cast that is a no-op at capture is dropped (Hugging Face's RMSNorm casts back with
``.to(input_dtype)``: ``to(x, float32)`` in an fp32 capture) and dtype arguments are
literals (``arange(dtype=inv_freq.dtype)``). So ``pipe.to(torch.bfloat16)`` after compiling
an fp32 model cannot compute what the model cast to bf16 computes (the built-in Llama's
rotary tables stay fp32 and its attention meets fp32 queries and bf16 values; HF norms
return fp32), and no run-time propagation of dtypes can prove otherwise. The step's
agreement (``param_dtype_agreement``) therefore carries each rank's parameter dtypes:
every rank raises a HelixError that names them, before any message, when a rank's
floating parameters or buffers are no longer in their compiled dtypes (or the ranks
differ). To train with bf16 parameters, cast (or build) the model in bf16 before
``helix_compile``; the graphs, receive specs and wire headers are then bf16 throughout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.fx as fx

from ..errors import HelixError
from ..kernels import attention_autocast as _attention_autocast  # noqa: F401  (registers its rule)
from .fingerprint import Agreement
from .wire import dtype_code, dtype_name

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


# ------------------------------------------------------------------ parameter dtypes
AS_COMPILED = 1 << 40  # agreement code: every floating owned tensor has its compiled dtype
_MIXED = 1 << 41  # | a bit per dtype: several dtypes, not the compiled ones
_KNOWN = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def compiled_dtypes(stage) -> dict[str, torch.dtype]:
    """The dtype of each floating tensor ``stage`` owns (parameters and buffers), as its
    program holds them (the pipeline records its own rank's before any ``to()``)."""
    owned = [*stage.params.items(), *stage.owned_state.buffers.items()]
    return {n: t.dtype for n, t in owned if t.is_floating_point()}


def _names(dtypes) -> str:
    return ", ".join(sorted({str(d).replace("torch.", "") for d in dtypes}))


def param_dtype_code(pipe) -> int:
    """This rank's floating parameters and buffers as one agreement code: AS_COMPILED, the
    code of their one dtype, or _MIXED with a bit per dtype."""
    now = {n: t.dtype for n, t in [*pipe.named_parameters(), *pipe.named_buffers()] if t.is_floating_point()}
    compiled = pipe._compiled_dtypes
    if all(compiled.get(n, d) == d for n, d in now.items()):
        return AS_COMPILED
    kinds = set(now.values())
    if len(kinds) == 1:
        return dtype_code(kinds.pop())
    return _MIXED | sum(1 << (_KNOWN.index(d) if d in _KNOWN else len(_KNOWN)) for d in kinds)


def describe_dtype_code(code: int, compiled=()) -> str:
    if code == AS_COMPILED:
        return f"{_names(compiled)} (as compiled)"
    if code & _MIXED:
        kinds = [str(d).replace("torch.", "") for i, d in enumerate(_KNOWN) if code >> i & 1]
        return "several dtypes (" + ", ".join(kinds + (["other"] if code >> len(_KNOWN) & 1 else [])) + ")"
    return dtype_name(code)


_FIX = ("the captured graphs are specialized on the compiled dtypes (no-op casts dropped, dtype "
        "arguments fixed), so the pipeline cannot follow pipe.to(dtype): cast the model before "
        "helix_compile (model.to(torch.bfloat16), or build it in bf16 on the meta device), the same on "
        "every rank, and keep fp32 master weights with helix_compiler.master_weight_optimizer")


def param_dtype_agreement(pipe, *, over_tp: bool = False) -> Agreement:
    """The step's agreement on the parameter dtypes: over the pipeline ranks that own
    floating tensors (every rank knows which from the stage programs), or over the tp ranks
    of the stage (``over_tp``, all of them)."""
    ranks = None if over_tp else tuple(r for r, st in enumerate(pipe.stages) if compiled_dtypes(st))

    def describe(rank: int, values: tuple[int, ...]) -> str:
        mine = over_tp or rank == pipe.rank  # other ranks' tensors here keep the compiled dtypes
        compiled = pipe._compiled_dtypes if mine else compiled_dtypes(pipe.stages[rank])
        return describe_dtype_code(values[0], compiled.values())

    what = "the dtype of the parameters and buffers" + (" over the tp ranks of a stage" if over_tp else "")
    return Agreement((param_dtype_code(pipe),), what, _FIX, ranks=ranks, describe=describe)


def check_param_dtypes(pipe) -> None:
    """After the agreement (every rank holds the same code, so every rank decides alike):
    raise unless the parameters and buffers are in their compiled dtypes."""
    code = param_dtype_code(pipe)
    if code != AS_COMPILED:
        raise HelixError(f"rank {pipe.rank}: the pipeline's parameters and buffers are {describe_dtype_code(code)}, "
                         f"but the program was compiled with {_names(pipe._compiled_dtypes.values())}; {_FIX}")


# ------------------------------------------------------------------ fake propagation
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
