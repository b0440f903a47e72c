"""Prove that every block of a layer ModuleList behaves like block 2 before replicating it.

Layer replication (``replicate.py``) exports three blocks and copies block 2 into the rest.
That is only the user's model if blocks 3..L-1 run the same ops as block 2 on the same
kind of inputs. Python decides that, and Python can tell layers apart in three places:

* the block's own state: a per-layer flag stored at construction (SmolLM3's ``use_rope``
  from ``config.no_rope_layers``), a different dropout rate, a hook on one layer;
* the block's index used at run time (``if (self.layer_idx + 1) % 4 == 0: skip RoPE``,
  ``config.no_rope_layers[self.layer_idx]`` read in ``forward``);
* the caller: the model's loop passing different arguments to different layers
  (``layer(x, None if i % 4 == 3 else rope)``), or code outside the loop that reads the
  number of layers.

``prove_uniform`` checks all three, cheaply, without ``torch.export``:

1. **State.** Every submodule's non-tensor attributes, hooks, training flag and
   parameter/buffer shapes, dtypes and ``requires_grad`` are compared with block 2's. A
   difference is a reason not to replicate, except an *index-like* attribute (an int equal
   to the block's index plus a constant, e.g. HF's ``layer_idx``).
2. **Run.** The model runs once on meta tensors (fake tensors if a meta run fails) under a
   dispatch recorder, at the export's example shapes. Blocks 0..2 run for real; a later
   block whose state equals block 2's exactly is replaced by a stub that records its call
   and returns outputs shaped like block 2's (its body is then the same code on the same
   state and the same kind of inputs); a block that differs by an index-like attribute runs
   for real and its recorded ATen ops (targets, constants, and where every tensor argument
   comes from, relative to the block) must equal block 2's. Every block's call (arguments,
   relative to the calling loop) must equal block 2's, and no op may run between blocks.
3. **Truncation.** The same recorder runs the three-block model the export sees (all
   blocks stubbed): the code before and after the loop and the calls of blocks 0..2 must
   equal the full model's.

What is not covered: behaviour keyed on hidden global state (a counter in a closure, a
dict keyed by ``id(module)``) with otherwise identical blocks, and a constant in a block
that happens to equal a traced size. A recorder failure (a data-dependent op on meta and
fake tensors) is a reason, not an error: the caller exports every layer.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_map_only

log = logging.getLogger(__name__)

REFERENCE = 2  # the block replication copies
_MISSING = object()


# --- 1. state --------------------------------------------------------------------------------------
def _same(a, b, depth: int = 0) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or type(a) is not type(b):
        return False
    if depth < 4:  # containers and modules held outside _modules, compared by what they hold
        if isinstance(a, torch.nn.Module):  # e.g. transformers' per-layer table of kernel modules
            sa, sb = _state(a), _state(b)
            return sa.keys() == sb.keys() and all(_same(sa[k], sb[k], depth + 1) for k in sa)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(_same(a[k], b[k], depth + 1) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(_same(x, y, depth + 1) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an incomparable value is a difference
        return False


def _state(block: torch.nn.Module) -> dict[tuple[str, str], object]:
    """(submodule path, attribute) -> value, for everything that can steer a block's Python."""
    out: dict[tuple[str, str], object] = {}
    for path, m in block.named_modules(remove_duplicate=False):
        out[(path, "__class__")] = type(m)
        for key, v in vars(m).items():
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            if "hook" in key and isinstance(v, dict):
                v = tuple(v.values())
            out[(path, key)] = v
        for kind, table in (("param", m._parameters), ("buffer", m._buffers)):
            for name, t in table.items():
                out[(path, f"{kind}:{name}")] = None if t is None else (
                    tuple(t.shape), t.dtype, t.device.type, bool(t.requires_grad), type(t))
    return out


def _index_like(values: list) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values) and \
        len({v - k for k, v in enumerate(values)}) == 1


def compare_states(layers: torch.nn.ModuleList, prefix: str) -> tuple[str | None, list[int], list[str]]:
    """``(reason, same, index_attrs)``: ``reason`` is None when the blocks differ at most in
    index-like attributes; ``same`` lists blocks > 2 whose state equals block 2's exactly."""
    states = [_state(b) for b in layers]
    keys = set().union(*states)
    index_attrs: list[str] = []
    for key in sorted(keys, key=str):
        values = [s.get(key, _MISSING) for s in states]
        if all(_same(v, values[REFERENCE]) for v in values):
            continue
        where = ".".join(p for p in (prefix, "{k}", key[0]) if p)
        if _index_like(values):
            index_attrs.append(f"{where.format(k='*')}.{key[1]}")
            continue
        k = next(i for i, v in enumerate(values) if not _same(v, values[REFERENCE]))
        def show(v):
            return "(absent)" if v is _MISSING else repr(v)[:80]
        return (f"block {k}'s {where.format(k=k)}.{key[1]} = {show(values[k])} differs from block "
                f"{REFERENCE}'s {show(values[REFERENCE])}", [], index_attrs)
    same = [] if index_attrs else list(range(REFERENCE + 1, len(layers)))
    return None, same, index_attrs


# --- 2. the recorder -------------------------------------------------------------------------------
class _Mismatch(Exception):
    pass


class Recorder(TorchDispatchMode):
    """Records every ATen op of one model run, split into the code before the layer loop
    (``pre``), each block (``blk k``), and the code after each block (``after k``), with
    every tensor argument named by where it came from."""

    def __init__(self, layers: torch.nn.ModuleList, prefix: str, names: dict[int, str], inputs, stubs: dict):
        """``stubs``: block index -> the outputs its stub imitates (None: block 2's)."""
        super().__init__()
        self.layers, self.prefix, self.names, self.stubs = layers, prefix, names, stubs
        self.L = len(layers)
        self.segs: dict[object, list] = {"pre": []}
        self.cur: object = "pre"
        self.block: int | None = None
        self.where: dict[int, tuple] = {id(t): ("input", i) for i, t in enumerate(inputs)}
        self.out_of: dict[int, tuple[int, int]] = {}
        self.arg_ids: dict[int, dict[int, int]] = {}
        self.calls: dict[int, object] = {}
        self.outputs: dict[int, object] = {}
        self.out_sig: dict[int, object] = {}
        self.order: list[int] = []
        self.keep: list = list(inputs)  # keep every seen tensor alive: ids stay unique
        self.paused = False

    # where a tensor comes from, seen from the current block (or the outer code: None)
    def ref(self, t: torch.Tensor, *, as_arg: bool = True):
        i, k = id(t), self.block
        if k is not None and as_arg:
            a = self.arg_ids[k].get(i)
            if a is not None:
                return ("arg", a)
        name = self.names.get(i)
        if name is not None:
            own = f"{self.prefix}.{k}." if k is not None else None
            if own is not None and name.startswith(own):
                return ("own", name[len(own):])
            return ("param", name)
        o = self.out_of.get(i)
        if o is not None:
            b, leaf = o
            if k is not None and b == k - 1:
                return ("prev_out", leaf)
            return ("out", self._block_id(b), leaf)
        w = self.where.get(i)
        if w is not None:
            seg = w[0]
            if isinstance(seg, tuple):
                kind, b = seg
                if kind == "blk" and k == b:
                    return ("local",) + w[1:]
                if kind == "blk" and k is not None and b == k - 1:
                    return ("prev_blk",) + w[1:]
                return (kind, self._block_id(b)) + w[1:]
            return w
        self.keep.append(t)
        return ("other", i)

    def _block_id(self, b: int):
        """Blocks seen from the outer code: 0 and 1 absolutely, later ones from the end (the
        last block is -1 in the full model and in the three-block one)."""
        if self.block is not None:
            return b
        return b if b < REFERENCE else b - self.L

    def encode(self, tree, *, as_arg: bool = True):
        return tree_map_only(torch.Tensor, lambda t: self.ref(t, as_arg=as_arg), tree)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        sig = (func, self.encode((args, kwargs)))
        out = func(*args, **kwargs)
        ops = self.segs[self.cur]
        pos = len(ops)
        ops.append(sig)
        leaves, _ = tree_flatten(out)
        for j, t in enumerate(leaves):
            if isinstance(t, torch.Tensor):
                self.where[id(t)] = (self.cur, pos, j)
                self.keep.append(t)
        return out

    # block boundaries (hooks on every block)
    def pre_hook(self, k: int, args, kwargs):
        if self.block is not None or self.order != list(range(k)):
            raise _Mismatch(f"block {k} was called out of order (after blocks {self.order})")
        self.order.append(k)
        self.block = k
        self.calls[k] = self.encode((args, kwargs), as_arg=False)
        leaves, _ = tree_flatten((args, kwargs))
        self.arg_ids[k] = {id(t): j for j, t in enumerate(leaves) if isinstance(t, torch.Tensor)}
        self.keep.extend(leaves)
        self.cur = ("blk", k)
        self.segs[self.cur] = []

    def post_hook(self, k: int, output):
        self.out_sig[k] = self.encode(output)
        self.outputs[k] = output
        leaves, _ = tree_flatten(output)
        for j, t in enumerate(leaves):
            if isinstance(t, torch.Tensor):
                self.out_of[id(t)] = (k, j)
                self.keep.append(t)
        self.block = None
        self.cur = ("after", k)
        self.segs[self.cur] = []

    def stub(self, k: int, like):
        """A forward returning fresh tensors shaped like ``like`` (None: block 2's outputs)."""
        def forward(*args, **kwargs):
            self.paused = True
            try:
                model = self.outputs[REFERENCE] if like is None else like
                return tree_map(lambda v: torch.empty_like(v) if isinstance(v, torch.Tensor) else v, model)
            finally:
                self.paused = False
        return forward

    @contextlib.contextmanager
    def attached(self):
        handles, saved = [], {}
        try:
            for k, blk in enumerate(self.layers):
                handles.append(blk.register_forward_pre_hook(
                    lambda m, a, kw, _k=k: self.pre_hook(_k, a, kw), with_kwargs=True, prepend=True))
                handles.append(blk.register_forward_hook(lambda m, a, o, _k=k: self.post_hook(_k, o)))
                if k in self.stubs:
                    saved[k] = blk.__dict__.get("forward", _MISSING)
                    blk.__dict__["forward"] = self.stub(k, self.stubs[k])
            yield self
        finally:
            for h in handles:
                h.remove()
            for k, old in saved.items():
                if old is _MISSING:
                    del self.layers[k].__dict__["forward"]
                else:
                    self.layers[k].__dict__["forward"] = old


def _record(module, layers, prefix, example_inputs, stubs: dict) -> tuple[Recorder, object]:
    """Run ``module`` once under a recorder: on meta tensors, or fake tensors if that fails."""
    errors = []
    for how in ("meta", "fake"):
        try:
            return _record_with(how, module, layers, prefix, example_inputs, stubs)
        except _Mismatch:
            raise
        except Exception as e:  # noqa: BLE001 - the recorder is a shortcut; any failure means "export all"
            errors.append(f"{how}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise _Mismatch("could not run the model on meta or fake tensors (" + "; ".join(errors) + ")")


def _record_with(how, module, layers, prefix, example_inputs, stubs):
    state = dict(module.named_parameters()) | dict(module.named_buffers())
    if how == "meta":
        swapped = {n: (t if t.device.type == "meta" else t.to("meta")) for n, t in state.items()}
        inputs = tuple(x.to("meta") for x in example_inputs)
        mode = contextlib.nullcontext()
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode

        swapped = state
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        inputs = tuple(mode.from_tensor(x) for x in example_inputs)
    names = {id(t): n for n, t in swapped.items()}
    rec = Recorder(layers, prefix, names, inputs, stubs)
    with torch.no_grad(), mode, rec.attached(), rec:
        if how == "meta" and any(swapped[n] is not state[n] for n in state):
            out = torch.func.functional_call(module, swapped, inputs, strict=False)
        else:
            out = module(*inputs)
    return rec, rec.encode(out)


def prove_uniform(module: torch.nn.Module, layers: torch.nn.ModuleList, prefix: str, example_inputs,
                  *, traced: int) -> str | None:
    """None if replicating block 2 of ``prefix`` over all blocks gives ``module`` exactly (see
    the module docstring), else the reason, in words."""
    from .replicate import truncated

    reason, same, index_attrs = compare_states(layers, prefix)
    if reason is not None:
        return reason
    try:
        # the full model: blocks 0..2 (and any with an index-like attribute) run, the rest are stubs
        full, full_out = _record(module, layers, prefix, example_inputs, stubs=dict.fromkeys(same))
        L = len(layers)
        if full.order != list(range(L)):
            return f"the model called blocks {full.order} of {prefix}, not 0..{L - 1} once each in order"
        for k in range(L - 1):
            if full.segs[("after", k)]:
                return (f"the model runs {len(full.segs[('after', k)])} ops between blocks {k} and {k + 1} "
                        f"of {prefix} (first: {full.segs[('after', k)][0][0]})")
        ref = REFERENCE
        for k in range(ref + 1, L):
            if full.calls[k] != full.calls[ref]:
                return f"block {k} of {prefix} is called with other arguments than block {ref}"
            if k not in same and full.segs[("blk", k)] != full.segs[("blk", ref)]:
                return (f"block {k} of {prefix} runs other ops than block {ref} "
                        f"(its state differs only in {index_attrs}, which its forward reads)")
            if k not in same and full.out_sig[k] != full.out_sig[ref]:
                return f"block {k} of {prefix} returns other values than block {ref}"
        # the three-block model the export sees: same code around the loop, same calls
        with truncated(layers, traced):
            short, short_out = _record(module, layers, prefix, example_inputs,
                                       stubs={k: full.outputs[k] for k in range(traced)})
        if short.segs["pre"] != full.segs["pre"]:
            return f"the code before {prefix} runs differently with {traced} blocks than with {L}"
        if short.segs[("after", traced - 1)] != full.segs[("after", L - 1)] or short_out != full_out:
            return f"the code after {prefix} runs differently with {traced} blocks than with {L}"
        for k in range(traced):
            if short.calls[k] != full.calls[k]:
                return f"block {k} of {prefix} is called differently with {traced} blocks than with {L}"
    except _Mismatch as e:
        return str(e)
    return None
