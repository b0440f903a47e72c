"""Pass: chunk token-wise MLP regions along the sequence (HelixPipe's ``--chunk-size``).

Design note
===========

What is matched (ATen training IR from ``torch.export.export(..., strict=False).module()``):

* GeLU MLP:  ``fc1 = aten.linear(x, W1, b1?)`` -> ``act = aten.gelu(fc1, approximate=a)`` ->
  ``out = aten.linear(act, W2, b2?)``;
* SwiGLU:    ``g = aten.linear(x, Wg, bg?)``, ``u = aten.linear(x, Wu, bu?)`` (same ``x``) ->
  ``m = aten.mul(aten.silu(g), u)`` (either operand order) -> ``out = aten.linear(m, Wd, bd?)``;

where every intermediate has exactly one user (otherwise the [s, ffn] tensor is needed
outside the region and chunking it would not remove it). Weights/biases may be any nodes
(``get_attr`` parameters in practice). HF GPT-2's ``gelu_new`` (tanh GeLU spelled out as
pow/tanh/mul ops) and ``Conv1D`` (addmm) are not matched: canonicalize them first.

What replaces it: one ``call_function`` node, ``chunked_gelu_mlp(x, W1, b1, W2, b2, ...)`` or
``chunked_swiglu_mlp(x, Wg, bg, Wu, bu, Wd, bd, ...)``, with ``num_chunks``, ``seq_dim``,
``recompute`` and the activation settings as keyword constants, the old output's
``node.meta`` (``val``, ``tensor_meta``, ``nn_module_stack``, ...) and a ``helix_mlp_chunk``
record. The region's nodes are erased.

Semantics:

* The sequence is cut with ``tensor_split(num_chunks, seq_dim)``: chunk sizes differ by at
  most one (the reference cuts pieces of N tokens with a shorter last one; here the knob is a
  count, and ``num_chunks=1`` is the unchunked computation).
* ``recompute=True`` (default): a ``torch.autograd.Function`` that, in forward, runs the
  chunks under ``no_grad`` writing each chunk's output into a preallocated output, and saves
  only ``x`` and the parameters. Backward re-runs each chunk's forward under autograd and
  differentiates it right away, chunk by chunk: the [s/n, ffn] intermediates of one chunk are
  live at a time and the [s, ffn] tensors never exist whole, in forward or backward. (This is
  stricter than the reference, which saves per-chunk fc1/GeLU outputs, and concatenates them
  for the weight gradients, so its peak bytes do not drop; see HELIXPIPE.md §4.) Costs one
  extra forward of the MLP GEMMs, like Megatron's recomputation.
* ``recompute=False``: the chunks run under ordinary autograd and are concatenated: smaller
  allocations (the paper's fragmentation argument), same saved bytes as unchunked.
* On CUDA the activation runs through the fused Triton kernels (``bias + GeLU`` after a
  bias-free fc1 GEMM, ``silu(gate) * up``); elsewhere through the same ATen ops as the
  original graph. ``activation_backend`` ("torch" / "triton") forces either.

Numerics (stated tolerance): each output row and each row of dx is computed by the same ops
on the same row, so they equal the unchunked graph up to GEMM blocking (bitwise on this
machine's CPU for the float64 test models; not guaranteed by BLAS). Weight/bias gradients are
sums over tokens: here a sum of per-chunk partial sums, i.e. a different summation order.
They match within floating-point reassociation: float64 rtol 1e-12, float32 rtol 1e-5 (half
precision parameters accumulate the chunk partials in fp32). With the Triton activation
(CUDA) the activation itself differs from ATen's by fp32 rounding (see the kernel tests).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import HelixError
from ..ir import meta
from ..kernels.chunked_mlp import ChunkedRecomputeMLP, chunked_gelu_mlp, chunked_swiglu_mlp
from . import PassResult

log = logging.getLogger(__name__)
aten = torch.ops.aten

MLP_CHUNK = meta.MLP_CHUNK  # node.meta key on the replacement node
LINEAR = aten.linear.default


# --- analysis ----------------------------------------------------------------------------------------
@dataclass
class MLPRegion:
    kind: str  # "gelu" or "swiglu"
    x: fx.Node
    params: tuple  # gelu: (w1, b1, w2, b2); swiglu: (wg, bg, wu, bu, wd, bd); None = no bias
    nodes: list[fx.Node]  # region nodes in graph order; nodes[-1] is the output linear
    approximate: str = "none"

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]


def _linear_parts(node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target == LINEAR):
        return None
    args = list(node.args) + [None] * (3 - len(node.args))
    bias = node.kwargs.get("bias", args[2])
    return args[0], args[1], bias


def _single_user(node: fx.Node, user: fx.Node) -> bool:
    return len(node.users) == 1 and user in node.users


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == target


def _match_gelu(out: fx.Node) -> MLPRegion | None:
    parts = _linear_parts(out)
    if parts is None:
        return None
    act, w2, b2 = parts
    if not (_is(act, aten.gelu.default) and _single_user(act, out)):
        return None
    fc1 = act.args[0]
    fc1_parts = _linear_parts(fc1)
    if fc1_parts is None or not _single_user(fc1, act):
        return None
    x, w1, b1 = fc1_parts
    approximate = act.kwargs.get("approximate", act.args[1] if len(act.args) > 1 else "none")
    return MLPRegion("gelu", x, (w1, b1, w2, b2), [fc1, act, out], approximate)


def _match_swiglu(out: fx.Node) -> MLPRegion | None:
    parts = _linear_parts(out)
    if parts is None:
        return None
    mul, wd, bd = parts
    if not (_is(mul, aten.mul.Tensor) and _single_user(mul, out) and len(mul.args) == 2):
        return None
    a, b = mul.args
    silu, up = (a, b) if _is(a, aten.silu.default) else (b, a)
    if not _is(silu, aten.silu.default) or silu is up or not _single_user(silu, mul):
        return None
    gate = silu.args[0]
    gate_parts, up_parts = _linear_parts(gate), _linear_parts(up)
    if gate_parts is None or up_parts is None or gate is up:
        return None
    if not (_single_user(gate, silu) and _single_user(up, mul)):
        return None
    x, wg, bg = gate_parts
    x_up, wu, bu = up_parts
    if x is not x_up:
        return None
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    nodes = sorted([gate, silu, up, mul, out], key=order.__getitem__)
    return MLPRegion("swiglu", x, (wg, bg, wu, bu, wd, bd), nodes)


def find_mlp_regions(gm: fx.GraphModule) -> list[MLPRegion]:
    """Every token-wise MLP region (GeLU MLP, SwiGLU), in graph order."""
    regions = []
    for node in gm.graph.nodes:
        region = _match_gelu(node) or _match_swiglu(node)
        if region is not None:
            regions.append(region)
    return regions


# --- rewrite -----------------------------------------------------------------------------------------
def _infer_seq_dim(x: fx.Node) -> int:
    """The sequence dim of ``x``'s FakeTensor: the single symbolic leading dim if there is one,
    else the dim right before the hidden one (``[batch, seq, hidden]``)."""
    shape = tuple(x.meta["val"].shape)
    if len(shape) < 2:
        raise HelixError(f"chunk_mlp: MLP input {x.format_node()} has shape {shape}: no "
                         "sequence dim to chunk")
    symbolic = [d for d, size in enumerate(shape[:-1]) if isinstance(size, torch.SymInt)]
    return symbolic[0] if len(symbolic) == 1 else len(shape) - 2


def _size_bounds(size) -> tuple[int | None, int | None]:
    if isinstance(size, int):
        return size, size
    try:
        node = size.node
        rng = node.shape_env.bound_sympy(node.expr)
        lo = int(rng.lower) if rng.lower.is_finite else None
        hi = int(rng.upper) if rng.upper.is_finite else None
        return lo, hi
    except Exception:  # unusual SymInt: leave the check to run time
        return None, None


def chunk_mlp(gm: fx.GraphModule, *, num_chunks: int, seq_dim: int | None = None,
              recompute: bool = True, activation_backend: str | None = None) -> PassResult:
    """Rewrite every GeLU-MLP / SwiGLU region into one node computing ``num_chunks`` chunks
    along the sequence. ``seq_dim`` indexes the MLP input (default: inferred, see
    ``_infer_seq_dim``). ``info``: ``regions`` (kind, replaced node names, new node name).
    """
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise HelixError(f"chunk_mlp: num_chunks={num_chunks!r} must be an int >= 1 "
                         "(1 = unchunked)")
    if activation_backend not in (None, "torch", "triton"):
        raise HelixError(f"chunk_mlp: activation_backend={activation_backend!r}; use None "
                         "(Triton on CUDA), 'torch' or 'triton'")
    regions = find_mlp_regions(gm)
    if not regions:
        msg = ("chunk_mlp: no MLP region matched (looked for linear->gelu->linear and "
               "silu(linear)*linear->linear with single-use intermediates); graph unchanged")
        log.warning(msg)
        warnings.warn(msg, stacklevel=2)
        return PassResult(gm, False, {"regions": [], "num_chunks": num_chunks})

    graph = gm.graph
    records = []
    for region in regions:
        out = region.output
        val = region.x.meta.get("val")
        if val is None:
            raise HelixError(f"chunk_mlp: {region.x.format_node()} has no meta['val']; run the "
                             "pass on a graph from torch.export")
        dim = _infer_seq_dim(region.x) if seq_dim is None else seq_dim
        if not -val.dim() <= dim < val.dim() - 1:
            raise HelixError(f"chunk_mlp: seq_dim={dim} is not a leading dim of the MLP input "
                             f"{tuple(val.shape)} at {out.format_node()}")
        dim %= val.dim()
        lo, hi = _size_bounds(val.shape[dim])
        if hi is not None and num_chunks > hi:
            raise HelixError(f"chunk_mlp: num_chunks={num_chunks} exceeds the sequence length "
                             f"({val.shape[dim]}, at most {hi}) of dim {dim} of the MLP input "
                             f"at {out.format_node()}; use 1 <= num_chunks <= {hi}")
        if lo is not None and num_chunks > lo:
            log.info("chunk_mlp: num_chunks=%d > the shortest allowed sequence (%s) at %s: "
                     "shorter inputs will raise at run time", num_chunks, lo, out.name)

        kwargs = dict(num_chunks=num_chunks, seq_dim=dim, recompute=recompute,
                      activation_backend=activation_backend, name=out.name)
        if region.kind == "gelu":
            target, kwargs["approximate"] = chunked_gelu_mlp, region.approximate
        else:
            target = chunked_swiglu_mlp
        with graph.inserting_before(out):
            new = graph.call_function(target, (region.x, *region.params), kwargs)
        new.meta = {k: v for k, v in out.meta.items()}
        record = {"kind": region.kind, "replaced": [n.name for n in region.nodes],
                  "node": new.name, "num_chunks": num_chunks, "seq_dim": dim,
                  "recompute": recompute}
        new.meta[MLP_CHUNK] = record
        out.replace_all_uses_with(new)
        for node in reversed(region.nodes):
            graph.erase_node(node)
        records.append(record)
        log.info("chunk_mlp: %s MLP %s -> %s (%d chunks on dim %d)", region.kind,
                 record["replaced"], new.name, num_chunks, dim)

    graph.lint()
    gm.recompile()
    return PassResult(gm, True, {"regions": records, "num_chunks": num_chunks})


__all__ = ["MLP_CHUNK", "MLPRegion", "ChunkedRecomputeMLP", "chunk_mlp", "chunked_gelu_mlp",
           "chunked_swiglu_mlp", "find_mlp_regions"]
