"""Capture an unmodified model as one ATen-level GraphModule through ``torch.export``.

Non-strict export with a dynamic batch and sequence dimension, so every shape in
``node.meta["val"]`` is symbolic in (batch, seq). Works on meta tensors: a model built under
``torch.device("meta")`` is captured without allocating its weights.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import Dim

from ..errors import CaptureError, HelixError, UnsupportedModelError
from ..ir.segment import B, S
from .adapters import adapt_model, describe_output
from .replicate import TRACED_LAYERS, find_uniform_layers, replicate_layers, truncated
from .uniform import prove_uniform

log = logging.getLogger(__name__)

TRACE_SEQ = 16  # sequence length of the example inputs used for tracing (shapes stay symbolic)
TRACE_BATCH = 2


@dataclass
class CapturedGraph:
    """One canonical graph of the user's model, plus what the later passes need to know."""

    gm: fx.GraphModule  # parameters/buffers are get_attr nodes named by their original FQNs
    module: torch.nn.Module  # the (adapted) module whose parameters the graph references
    input_names: list[str]  # placeholders in order, e.g. ["input_ids", "labels"]
    symbols: dict[sympy.Symbol, sympy.Symbol] = field(default_factory=dict)  # export symbol -> B/S
    max_seq_len: int | None = None  # upper bound export found (learned position tables)
    min_seq_len: int = 2  # lower bound export found (3 for a loss on shifted logits)
    fqn_prefix: str = ""  # prefix the adapter adds to the user's parameter names ("model.")
    # how the layers were captured: {"replicated": bool, "reason": str, "prefix", "num_layers", ...}
    layer_replication: dict = field(default_factory=dict)

    def user_fqn(self, name: str) -> str:
        """The user's fully qualified name of a parameter/buffer the graph calls ``name``."""
        return name[len(self.fqn_prefix):] if name.startswith(self.fqn_prefix) else name

    def to_cost_expr(self, x) -> sympy.Expr:
        """A size (int or SymInt) as an expression in B and S."""
        if isinstance(x, torch.SymInt):
            return sympy.sympify(x.node.expr).xreplace(self.symbols)
        return sympy.Integer(int(x))

    def numel_expr(self, val) -> sympy.Expr:
        n = sympy.Integer(1)
        for d in val.shape:
            n = n * self.to_cost_expr(d)
        return n


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise HelixError(f"{name}={value!r} must be a positive integer")


def _example_inputs(module: torch.nn.Module, batch: int, seq: int, inputs: tuple[str, ...] = (),
                    given: dict | None = None) -> tuple[torch.Tensor, ...]:
    """Tracing inputs in the adapter's order: token ids, labels, then each extra input (given,
    or one unpadded document: ``position_ids`` 0..seq-1, ``attention_mask`` ones, anything
    else zeros)."""
    device = next(iter(module.parameters())).device
    gen = torch.Generator().manual_seed(0)
    given = given or {}
    if "input_ids" in given:
        ids, labels = given["input_ids"], given["labels"]
        batch, seq = ids.shape
    else:
        vocab = _vocab_size(module)
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    out = [ids.to(device), labels.to(device)]
    for name in inputs:
        if name in given:
            t = given[name]
        elif name == "position_ids":
            t = torch.arange(seq).repeat(batch, 1)
        elif name == "attention_mask":
            t = torch.ones(batch, seq, dtype=torch.long)
        else:
            t = torch.zeros(batch, seq, dtype=torch.long)
        out.append(t.to(device))
    return tuple(out)


def _vocab_size(module: torch.nn.Module) -> int:
    for m in module.modules():
        if isinstance(m, torch.nn.Embedding):
            return m.num_embeddings
    raise UnsupportedModelError("no nn.Embedding found: helix_compiler expects a token-id language model")


_MAX_RE = re.compile(r"Dim\(\s*['\"]seq['\"]\s*,[^)]*max\s*=\s*(\d+)")
_MIN_RE = re.compile(r"Dim\(\s*['\"]seq['\"]\s*,[^)]*min\s*=\s*(\d+)")


def _export(module, args, seq_max: int | None, seq_min: int = 2):
    seq = Dim("seq", min=seq_min, max=seq_max) if seq_max else Dim("seq", min=seq_min)
    batch = Dim("batch", min=1)
    shapes = tuple({0: batch, 1: seq} for _ in args)
    return torch.export.export(module, args, dynamic_shapes=shapes, strict=False)


def _export_bounded(module, example_inputs):
    """Export ``(program, seq_max, seq_min)``. If the model bounds the sequence length (a
    learned position table: a maximum; a loss on shifted logits ``logits[:, :-1]``: at least
    3 tokens, so that the shifted length is not the special size 1), export says so in its
    suggested fix: retry with that range."""
    seq_max, seq_min = None, 2
    for _ in range(3):
        try:
            return _export(module, example_inputs, seq_max, seq_min), seq_max, seq_min
        except Exception as e:
            text = str(e)
            mx, mn = _MAX_RE.search(text), _MIN_RE.search(text)
            bounds = (int(mx.group(1)) if mx else seq_max, max(seq_min, int(mn.group(1))) if mn else seq_min)
            if "Constraints violated" not in text or bounds == (seq_max, seq_min):
                raise
            seq_max, seq_min = bounds
    return _export(module, example_inputs, seq_max, seq_min), seq_max, seq_min


def _export_graph(module, example_inputs, replicate: bool) -> tuple[fx.GraphModule, tuple, dict]:
    """The graph, the export's sequence bounds ``(min, max or None)``, and how the layers were captured
    (``{"replicated": bool, "reason": str, ...}``, kept as ``CapturedGraph.layer_replication``)."""
    if not replicate:
        info = {"replicated": False, "reason": "replicate_layers=False"}
    elif (uniform := find_uniform_layers(module)) is None:
        info = {"replicated": False, "reason": "no layer ModuleList of more than "
                f"{TRACED_LAYERS} blocks with one class and one parameter layout"}
    else:
        prefix, layers = uniform
        info = {"replicated": False, "prefix": prefix, "num_layers": len(layers), "traced_layers": TRACED_LAYERS}
        reason = prove_uniform(module, layers, prefix, example_inputs, traced=TRACED_LAYERS)
        if reason is None:
            with truncated(layers, TRACED_LAYERS):
                ep, seq_max, seq_min = _export_bounded(module, example_inputs)
            gm = ep.module()
            _strip_export_artifacts(gm)
            full = replicate_layers(gm, module, prefix, len(layers))
            if full is not None:
                return full, (seq_min, seq_max), {**info, "replicated": True,
                                                  "reason": "every block proven to run as block 2"}
            reason = f"blocks 1 and 2 of {prefix} traced to different graphs"
        log.info("layer replication off for %s: %s; exporting every layer", prefix, reason)
        info["reason"] = reason
    ep, seq_max, seq_min = _export_bounded(module, example_inputs)
    gm = ep.module()
    _strip_export_artifacts(gm)
    return gm, (seq_min, seq_max), info


def capture(model: torch.nn.Module, *, seq_len: int, example_inputs=None, loss_fn=None,
            replicate_layers: bool = True, loss_output: int | str | None = None,
            inputs: tuple[str, ...] = ()) -> CapturedGraph:
    """Capture ``model`` (called as ``model(input_ids, labels) -> loss``, or
    ``loss_fn(model(input_ids), labels)``; Hugging Face causal LMs are adapted) as one
    ATen graph with symbolic batch and sequence sizes. ``seq_len`` is checked against the
    longest sequence the model supports. ``replicate_layers``: export three blocks of a deep
    model and copy the third (see ``replicate.py``); False exports every layer.
    ``loss_output``: the position or key of the loss when the model returns several values.
    ``inputs``: the extra per-token inputs (``("position_ids",)``...), placeholders of the graph
    after ``input_ids`` and ``labels``, passed to the model by keyword.
    The captured graph must return one 0-dim floating tensor (the loss), else CaptureError."""
    _check_positive_int("seq_len", seq_len)
    if seq_len < 2:
        raise HelixError(f"seq_len={seq_len} must be at least 2")
    inputs = tuple(inputs)
    module = adapt_model(model, loss_fn=loss_fn, loss_output=loss_output, inputs=inputs)
    given = check_example_inputs(example_inputs, inputs)
    example_inputs = _example_inputs(module, TRACE_BATCH, max(3, min(TRACE_SEQ, seq_len)), inputs,
                                     given)
    try:
        gm, (seq_min, seq_max), replication = _export_graph(module, example_inputs, replicate_layers)
    except HelixError:
        raise
    except Exception as e:
        raise CaptureError(_explain_export_failure(model, e)) from e
    if seq_len < seq_min:
        raise UnsupportedModelError(
            f"seq_len={seq_len} is shorter than the model supports: it needs at least {seq_min} tokens "
            f"(e.g. a loss on shifted logits); use seq_len >= {seq_min}")
    if seq_max is None:  # export does not bound an embedding's index range: look for the table
        seq_max = _position_table_rows(gm)
    if seq_max is not None and seq_len > seq_max:
        raise UnsupportedModelError(
            f"seq_len={seq_len} is longer than the model supports: a learned position table (or "
            f"another size-bound op) limits sequences to {seq_max} tokens; use seq_len <= {seq_max} "
            f"or enlarge the position table (e.g. GPT-2's n_positions)")
    captured = CapturedGraph(gm=gm, module=module, input_names=[n.name for n in gm.graph.nodes if n.op == "placeholder"],
                             max_seq_len=seq_max, fqn_prefix="" if module is model else "model.",
                             layer_replication=replication)
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder")
    b_sym, s_sym = (d.node.expr for d in ids.meta["val"].shape)
    if not (isinstance(b_sym, sympy.Symbol) and isinstance(s_sym, sympy.Symbol)):
        raise CaptureError(f"batch and sequence dimensions were specialised during export "
                           f"(input_ids shape {tuple(ids.meta['val'].shape)}); the model must not branch on them")
    captured.symbols = {b_sym: B, s_sym: S}
    captured.min_seq_len = seq_min
    _check_loss_output(captured, model, loss_fn=loss_fn, loss_output=loss_output)
    return captured


def check_example_inputs(example_inputs, inputs: tuple[str, ...] = ()) -> dict[str, torch.Tensor] | None:
    """``example_inputs`` is ``(input_ids, labels)`` or a dict with those two keys and any of
    the extra ``inputs``: integer [batch, seq] token ids and labels of one shape (labels are
    traced: the loss reads them), extra inputs of that shape too. None: helix_compiler makes
    them. Returns them by name."""
    if example_inputs is None:
        return None
    fix = ("pass example_inputs=(input_ids, labels) with labels an integer tensor of input_ids' shape "
           "(e.g. labels=input_ids.clone()), or example_inputs=None to let helix_compiler make them")
    if isinstance(example_inputs, dict):
        unknown = sorted(set(example_inputs) - {"input_ids", "labels", *inputs})
        if unknown:
            raise HelixError(f"example_inputs has {unknown[0]!r}, which is neither input_ids, labels nor one of "
                             f"inputs={tuple(inputs)!r}; add it to inputs or leave it out")
        ex = (example_inputs.get("input_ids"), example_inputs.get("labels"))
        extra = {k: v for k, v in example_inputs.items() if k not in ("input_ids", "labels")}
    elif isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        raise HelixError(f"example_inputs must be a tuple (input_ids, labels); got {type(example_inputs).__name__}")
    else:
        ex, extra = tuple(example_inputs), {}
        if len(ex) != 2:
            raise HelixError(f"example_inputs must be (input_ids, labels); got {len(ex)} values. The model is "
                             f"traced as model(input_ids, labels) -> loss: add labels (e.g. input_ids.clone()); "
                             f"extra inputs go in a dict, example_inputs={{'input_ids': ..., 'labels': ..., "
                             f"'position_ids': ...}}")
    for name, t in zip(("input_ids", "labels"), ex, strict=True):
        if t is None:
            raise HelixError(f"example_inputs: {name} is None; the model is traced as model(input_ids, labels) "
                             f"-> loss and the loss reads the labels: {fix}")
        if not isinstance(t, torch.Tensor):
            raise HelixError(f"example_inputs: {name} is a {type(t).__name__}, not a tensor: {fix}")
        if t.dim() != 2 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise HelixError(f"example_inputs: {name} is a {t.dtype} tensor of shape {tuple(t.shape)}; "
                             f"expected integer token ids of shape [batch, seq]: {fix}")
    if ex[0].shape != ex[1].shape:
        raise HelixError(f"example_inputs: labels shape {tuple(ex[1].shape)} differs from input_ids shape "
                         f"{tuple(ex[0].shape)}: {fix}")
    for name, t in extra.items():
        if not isinstance(t, torch.Tensor) or t.shape != ex[0].shape:
            what = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
            raise HelixError(f"example_inputs: {name} is {what}; every input is a [batch, seq] tensor of "
                             f"input_ids' shape {tuple(ex[0].shape)}")
    return {"input_ids": ex[0], "labels": ex[1], **extra}


def _check_loss_output(captured: CapturedGraph, model, *, loss_fn, loss_output) -> None:
    """The graph must return the loss: one 0-dim floating tensor. Anything else (logits, a
    dict, a tuple) would be trained on as if it were the loss."""
    gm = captured.gm
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    vals = [x.meta.get("val") if isinstance(x, fx.Node) else x for x in leaves]
    if len(vals) == 1 and isinstance(vals[0], torch.Tensor) and vals[0].dim() == 0 \
            and vals[0].dtype.is_floating_point:
        return
    spec = getattr(gm, "_out_spec", None)
    try:
        value = pytree.tree_unflatten(vals, spec) if spec is not None else tuple(vals)
    except Exception:  # noqa: BLE001 - only for the message
        value = tuple(vals)
    names = {B: sympy.Symbol("batch"), S: sympy.Symbol("seq")}
    shown = describe_output(value, dim_name=lambda d: str(captured.to_cost_expr(d).xreplace(names)))
    who = "loss_fn" if loss_fn is not None else f"{type(model).__name__}.forward"
    if loss_output is not None:
        fix = f"loss_output={loss_output!r} must select the loss itself (a 0-dim floating tensor)"
    elif loss_fn is not None:
        fix = ("loss_fn(logits, labels) must return the scalar loss, e.g. "
               "F.cross_entropy(logits.flatten(0, 1), labels.flatten())")
    else:
        fix = ("return the loss from forward(input_ids, labels), or pass loss_fn=lambda logits, labels: ... "
               "(the model is then called as model(input_ids) and loss_fn gets its output)")
        pick = _scalar_positions(value)
        if len(pick) == 1:
            fix = f"pass loss_output={pick[0]!r} (the loss among the outputs), or " + fix
    raise CaptureError(f"{who} returned {shown}, not a scalar loss: helix_compiler trains on the "
                       f"captured output, which must be one 0-dim floating tensor; fix: {fix}")


def _scalar_positions(value) -> list:
    """Top-level positions/keys of ``value`` holding a 0-dim floating tensor."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (tuple, list)) else ()
    return [k for k, v in items if isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype.is_floating_point]


def _position_table_rows(gm: fx.GraphModule) -> int | None:
    """Rows of the smallest embedding table indexed by shape-only ids (learned positions)."""
    from ..passes.data_independence import find_data_independent

    independent = find_data_independent(gm)
    rows = [int(n.args[0].meta["val"].shape[0]) for n in gm.graph.nodes
            if n.op == "call_function" and n.target == torch.ops.aten.embedding.default
            and n.args[1] in independent and n.args[0] not in independent]
    return min(rows, default=None)


def _strip_export_artifacts(gm: fx.GraphModule) -> None:
    """Drop runtime guard/assert nodes export adds: they pin shapes and keep mask subgraphs alive."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in (
                torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
                torch.ops.aten.sym_constrain_range_for_size.default):
            if not node.users:
                graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    graph.eliminate_dead_code()
    gm.recompile()


def _explain_export_failure(model: torch.nn.Module, e: Exception) -> str:
    msg = str(e).strip().splitlines()
    head = "\n".join(msg[:12])
    hints = []
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "use_cache", False):
        hints.append("set model.config.use_cache = False")
    text = str(e)
    if "data-dependent" in text or "GuardOnDataDependentSymNode" in text or "Could not guard" in text:
        hints.append("remove data-dependent Python control flow (an `if` on a tensor value) from forward")
    if "Constraints violated" in text:
        hints.append("the model specialises on the batch or sequence length; make forward shape-generic")
    hint = ("; ".join(hints)) or "check that model(input_ids, labels) runs and returns a scalar loss"
    return f"could not capture {type(model).__name__} with torch.export (non-strict): {head}\nfix: {hint}"
