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
from torch.export import Dim

from ..errors import CaptureError, HelixError, UnsupportedModelError
from ..ir.segment import B, S
from .adapters import adapt_model
from .replicate import TRACED_LAYERS, find_uniform_layers, replicate_layers, truncated

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
    fqn_prefix: str = ""  # prefix the adapter adds to the user's parameter names ("model.")

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


def _example_inputs(module: torch.nn.Module, batch: int, seq: int) -> tuple[torch.Tensor, ...]:
    device = next(iter(module.parameters())).device
    vocab = _vocab_size(module)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    return ids.to(device), labels.to(device)


def _vocab_size(module: torch.nn.Module) -> int:
    for m in module.modules():
        if isinstance(m, torch.nn.Embedding):
            return m.num_embeddings
    raise UnsupportedModelError("no nn.Embedding found: helix_compiler expects a token-id language model")


_MAX_RE = re.compile(r"Dim\(\s*['\"]seq['\"]\s*,[^)]*max\s*=\s*(\d+)")


def _export(module, args, seq_max: int | None):
    seq = Dim("seq", min=2, max=seq_max) if seq_max else Dim("seq", min=2)
    batch = Dim("batch", min=1)
    shapes = tuple({0: batch, 1: seq} for _ in args)
    return torch.export.export(module, args, dynamic_shapes=shapes, strict=False)


def _export_bounded(module, example_inputs):
    """Export; if a size-bound op limits the sequence, export says by how much: retry with it."""
    try:
        return _export(module, example_inputs, None), None
    except Exception as e:
        m = _MAX_RE.search(str(e))
        if m is None:
            raise
        seq_max = int(m.group(1))
        return _export(module, example_inputs, seq_max), seq_max


def _export_graph(module, example_inputs, replicate: bool):
    uniform = find_uniform_layers(module) if replicate else None
    if uniform is not None:
        prefix, layers = uniform
        with truncated(layers, TRACED_LAYERS):
            ep, seq_max = _export_bounded(module, example_inputs)
        gm = ep.module()
        _strip_export_artifacts(gm)
        full = replicate_layers(gm, module, prefix, len(layers))
        if full is not None:
            return full, seq_max
    ep, seq_max = _export_bounded(module, example_inputs)
    gm = ep.module()
    _strip_export_artifacts(gm)
    return gm, seq_max


def capture(model: torch.nn.Module, *, seq_len: int, example_inputs=None, loss_fn=None,
            replicate_layers: bool = True) -> CapturedGraph:
    """Capture ``model`` (called as ``model(input_ids, labels) -> loss``, or
    ``loss_fn(model(input_ids), labels)``; Hugging Face causal LMs are adapted) as one
    ATen graph with symbolic batch and sequence sizes. ``seq_len`` is checked against the
    longest sequence the model supports. ``replicate_layers``: export three blocks of a deep
    model and copy the third (see ``replicate.py``); False exports every layer."""
    _check_positive_int("seq_len", seq_len)
    if seq_len < 2:
        raise HelixError(f"seq_len={seq_len} must be at least 2")
    module = adapt_model(model, loss_fn=loss_fn)
    if example_inputs is None:
        example_inputs = _example_inputs(module, TRACE_BATCH, min(TRACE_SEQ, seq_len))
    example_inputs = tuple(example_inputs)
    if len(example_inputs) != 2:
        raise HelixError(f"expected example inputs (input_ids, labels); got {len(example_inputs)} tensors")
    try:
        gm, seq_max = _export_graph(module, example_inputs, replicate_layers)
    except HelixError:
        raise
    except Exception as e:
        raise CaptureError(_explain_export_failure(model, e)) from e
    if seq_max is None:  # export does not bound an embedding's index range: look for the table
        seq_max = _position_table_rows(gm)
    if seq_max is not None and seq_len > seq_max:
        raise UnsupportedModelError(
            f"seq_len={seq_len} is longer than the model supports: a learned position table (or "
            f"another size-bound op) limits sequences to {seq_max} tokens; use seq_len <= {seq_max} "
            f"or enlarge the position table (e.g. GPT-2's n_positions)")
    captured = CapturedGraph(gm=gm, module=module, input_names=[n.name for n in gm.graph.nodes if n.op == "placeholder"],
                             max_seq_len=seq_max, fqn_prefix="" if module is model else "model.")
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder")
    b_sym, s_sym = (d.node.expr for d in ids.meta["val"].shape)
    if not (isinstance(b_sym, sympy.Symbol) and isinstance(s_sym, sympy.Symbol)):
        raise CaptureError(f"batch and sequence dimensions were specialised during export "
                           f"(input_ids shape {tuple(ids.meta['val'].shape)}); the model must not branch on them")
    captured.symbols = {b_sym: B, s_sym: S}
    return captured


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
