"""Symbolic cost model: FLOPs and bytes of every segment as sympy expressions in (b, s).

Matmul FLOPs follow ``torch.utils.flop_counter.FlopCounterMode`` exactly (2*M*N*K per
matmul, bias adds not counted; backward counts only the gradients autograd computes: the
input gradient when the input requires grad, the weight gradient when the weight does).
Attention is counted dense as FlopCounterMode counts SDPA (forward 4*b*h*s_q*s_k*d, backward
twice that); ``SegmentCost.attention_causal_factor`` (1/2) is what a causal kernel really does,
and ``extra["attention_computed_fraction"]`` what a windowed kernel, or any kernel over packed
documents (``segment_cost(document_lengths=...)``), does (see :func:`attention_computed_fraction`).
Saved-activation bytes follow autograd's saved tensors op by op (policy "none") or the
recompute boundaries (other policies); which parts each policy keeps and reruns is the table
in ``ir.recompute``.
"""

from __future__ import annotations

import operator

import sympy
import torch
import torch.fx as fx

from ..errors import HelixError
from ..ir.program import Segment
from ..ir.recompute import (
    STASH_ALL,
    STASH_ALL_BUT_ATTENTION,
    STASH_INPUTS,
    STASH_INPUTS_ATTENTION,
    policy_for,
)
from ..ir.segment import POLICIES, SegmentCost
from ..kernels import attention as _attention_op  # noqa: F401  (registers helix::attention)
from ..kernels.chunked_mlp import chunked_gelu_mlp, chunked_swiglu_mlp
from ..kernels.tensor_parallel import (
    sp_all_gather,
    sp_gather,
    sp_reduce_scatter,
    sp_split,
    tp_copy,
    tp_reduce,
    vocab_parallel_cross_entropy,
)

aten = torch.ops.aten
HELIX_ATTENTION = torch.ops.helix.attention.default
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
         aten.permute.default, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
         aten.slice.Tensor, aten.select.int, aten.alias.default, aten.contiguous.default,
         aten.split.Tensor, aten.chunk.default, aten.split_with_sizes.default}
COPY_IF_STRIDED = {aten.reshape.default, aten.contiguous.default}
POINTWISE_SAVE_INPUT = {aten.gelu.default, aten.silu.default, aten.pow.Tensor_Scalar, aten.sin.default,
                        aten.cos.default}
# autograd saves these ops' results, not their inputs (mean.dim saves nothing: only sizes)
POINTWISE_SAVE_OUTPUT = {aten.tanh.default, aten.sigmoid.default, aten.rsqrt.default, aten.exp.default,
                         aten.relu.default, aten.sqrt.default}


class _Sizes:
    def __init__(self, to_expr):
        self.to_expr = to_expr

    def shape(self, n) -> list[sympy.Expr]:
        return [self.to_expr(d) for d in n.meta["val"].shape]

    def numel(self, n) -> sympy.Expr:
        out = sympy.Integer(1)
        for d in self.shape(n):
            out *= d
        return out

    def nbytes(self, n) -> sympy.Expr:
        val = n.meta.get("val")
        if isinstance(val, (list, tuple)):
            return sympy.Integer(0)
        if not isinstance(val, torch.Tensor):
            return sympy.Integer(0)
        return self.numel(n) * val.element_size()


def _prod(xs) -> sympy.Expr:
    out = sympy.Integer(1)
    for x in xs:
        out *= x
    return out


def _is_view(n: fx.Node) -> bool:
    """A view op, or one piece (getitem) of a split/chunk: it shares its input's storage
    (a reshape or contiguous of a non-contiguous tensor, e.g. heads transposed back, copies)."""
    if n.op != "call_function":
        return False
    if n.target is operator.getitem:
        return n.args[0].op == "call_function" and n.args[0].target in VIEWS
    if n.target in COPY_IF_STRIDED:
        src = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
        if isinstance(src, torch.Tensor) and not _contiguous(src):
            return False
    return n.target in VIEWS


def _contiguous(t: torch.Tensor) -> bool:
    try:
        return bool(t.is_contiguous())
    except Exception:  # noqa: BLE001 - symbolic strides that cannot be decided: take it as a view
        return True


def _base(n: fx.Node) -> fx.Node:
    """The node whose storage ``n`` views (saved tensors are counted once per storage)."""
    while _is_view(n):
        n = n.args[0]
    return n


def _band(s, left: int | None):
    """Scores a causal kernel computes for ``s`` queries over the same ``s`` keys: ``s(s+1)/2``
    (``left`` None: no window), or with a causal sliding window ``(left, 0)`` (each row sees
    ``min(i, left) + 1`` keys) ``s(s+1)/2`` while ``s <= left + 1`` and
    ``(left+1) s - left(left+1)/2`` after (a Piecewise when ``s`` is symbolic)."""
    if left is None:
        return s * (s + 1) / 2
    return sympy.Piecewise((s * (s + 1) / 2, s <= left + 1),
                           ((left + 1) * s - sympy.Rational(left * (left + 1), 2), True))


def _window_left(causal: bool, window) -> int | None:
    """The left extent of a causal sliding window, or None when the kernel's band is plain causal."""
    if window is None or tuple(window) == (-1, -1) or not causal:
        return None
    left = int(window[0])
    return left if left >= 0 else None


def attention_computed_fraction(sq, sk, causal: bool, window, document_lengths=None) -> sympy.Expr:
    """Fraction of the dense ``sq x sk`` score matrix a kernel computes: 1 (full), 1/2 (causal,
    ``attention_causal_factor``'s value), or, for a causal sliding window ``(left, 0)`` at
    ``sq == sk == s``, ``band(s) / s**2`` with ``band(s) = s(s+1)/2`` while ``s <= left + 1``
    and ``(left+1) s - left(left+1)/2`` after (each row sees ``min(i, left) + 1`` keys).

    ``document_lengths``: the lengths ``l_i`` of the documents packed into one sequence of
    ``s = sum(l_i)`` tokens with document masking (``sq == sk == s``): each document is its own
    block, so the fraction is ``sum_i band(l_i) / s**2`` (causal, ``band`` as above with or
    without the window) or ``sum_i l_i**2 / s**2`` (non-causal), a plain Rational (the lengths
    fix ``s``). Attention with ``sq != sk`` ignores the documents."""
    square = sympy.simplify(sq - sk) == 0
    left = _window_left(causal, window)
    if document_lengths is not None and square:
        docs = [int(d) for d in document_lengths]
        if not docs or any(d <= 0 for d in docs):
            raise HelixError(f"document_lengths={tuple(document_lengths)!r} must be positive lengths")
        s = sum(docs)
        if sympy.sympify(sq).is_Number and int(sq) != s:
            raise HelixError(f"document_lengths={tuple(docs)!r} sum to {s}, but the attention sees "
                             f"{int(sq)} tokens")
        if causal:
            blocks = sum((_band(sympy.Integer(d), left) for d in docs), sympy.Integer(0))
        else:
            blocks = sympy.Integer(sum(d * d for d in docs))
        return sympy.Rational(blocks) / (s * s)
    if not causal:
        return sympy.Integer(1)
    if left is None or not square:
        return sympy.Rational(1, 2)
    return _band(sq, left) / (sq * sq)


def _fraction_extra(attn_frac: list[tuple[sympy.Expr, sympy.Expr]], *, always: bool) -> dict[str, sympy.Expr]:
    """``extra["attention_computed_fraction"]``: the FLOP-weighted fraction of the segment's
    dense attention FLOPs the kernels compute (a sympy expression in S for a window, a number
    for packed documents), for segments with a windowed attention, or (``always``: packed
    documents) every segment with an attention. ``attention_causal_factor`` stays 1/2 (its
    readers take it as a number, and a window's fraction depends on s); cost readers go through
    ``sim.costs.attention_fraction``, which prefers this key."""
    if not attn_frac:
        return {}
    if not always and all(frac in (sympy.Rational(1, 2), sympy.Integer(1)) for _, frac in attn_frac):
        return {}
    fracs = {frac for _, frac in attn_frac}
    if len(fracs) == 1:
        return {"attention_computed_fraction": fracs.pop()}
    total = sum((f for f, _ in attn_frac), sympy.Integer(0))
    return {"attention_computed_fraction": sum((f * frac for f, frac in attn_frac), sympy.Integer(0)) / total}


# ``passes.mlp_chunk``'s replacement nodes: one call computing the whole MLP chunk by chunk
CHUNKED_MLPS = {chunked_gelu_mlp: (1, 3), chunked_swiglu_mlp: (1, 3, 5)}  # weight argument positions


def _chunked_mlp_cost(n: fx.Node, sz: _Sizes) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr]:
    """(FLOPs of the matmuls reading the MLP input, FLOPs of the output matmul, bytes autograd
    saves for the unchunked MLP's intermediates) of a chunked MLP node: the same GEMMs as the
    region it replaced (fc1 + fc2, or gate + up + down), whatever the chunk count."""
    root = n.graph.owning_module
    shapes = [tuple(root.get_parameter(n.args[k].target).shape) for k in CHUNKED_MLPS[n.target]]
    tokens = _prod(sz.shape(n.args[0])[:-1])
    flops = [2 * tokens * out * inp for out, inp in shapes]  # linear weights are [out, in]
    ffn = shapes[0][0]
    # GeLU: fc1's output (gelu's input) and gelu's output (fc2's input); SwiGLU: gate, silu(gate),
    # up and their product (down's input), as the unchunked ops save them
    n_saved = 2 if n.target is chunked_gelu_mlp else 4
    saved = n_saved * tokens * ffn * n.meta["val"].element_size()
    return sum(flops[:-1], sympy.Integer(0)), flops[-1], saved


def _runtime_memory(rules, sz, chain_phs, saved, attn_nodes, outs, is_param):
    """What the runtime holds per policy, counted by storage (``SegmentCost.held_bytes``,
    ``rerun_bytes``, ``out_new_bytes``), from four sets of storages: the chain inputs (the
    executor keeps them as the forward's autograd leaves), what autograd saves (``saved``,
    keyed by base node), the attentions' (out, lse) (a recorded or replayed attention's output
    is that storage) and the outputs (parameters left out: shipped weights are the weights)."""

    def storage(n):
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in attn_nodes:
            return n.args[0]
        return _base(n)

    inputs = {storage(ph): sz.nbytes(ph) for ph in chain_phs}
    attention = {n: saved[n] for n in attn_nodes if n in saved}
    outputs = {}  # a view's storage is its base's (q, k, v split from one projection: one storage)
    for o in outs:
        if isinstance(o, fx.Node) and o.op != "get_attr" and not is_param.get(o, False):
            key = storage(o)
            outputs[key] = sz.nbytes(o if key in attn_nodes else key)

    def size(*sets, minus=()) -> sympy.Expr:
        keys = set().union(*sets) - set().union(*minus)
        return sympy.expand(sum((next(d[k] for d in sets if k in d) for k in keys), sympy.Integer(0)))

    stashed = {STASH_ALL: (saved,), STASH_INPUTS: (), STASH_INPUTS_ATTENTION: (attention,),
               STASH_ALL_BUT_ATTENTION: ({k: v for k, v in saved.items() if k not in attention},)}
    held, rerun, out_new = {}, {}, {}
    for pol, r in rules.items():
        kept = (inputs, *stashed[r.stash])
        held[pol] = size(*kept)
        rerun[pol] = size(saved, outputs, minus=kept) if r.recomputes else sympy.Integer(0)
        out_new[pol] = size(outputs, minus=(*kept, saved) if r.stash == STASH_ALL else kept)
    return held, rerun, out_new


def segment_cost(seg: Segment, *, to_expr, owned_params: set[str], param_bytes: dict[str, int],
                 document_lengths: tuple[int, ...] | None = None, tensor_parallel: int = 1) -> SegmentCost:
    """Cost of one segment. ``document_lengths``: documents packed into each sequence (document
    masking); every segment with an attention then carries
    ``extra["attention_computed_fraction"]`` (see :func:`attention_computed_fraction`).
    ``tensor_parallel``: the graph is one tp rank's (``passes.tensor_parallel``); its
    all-reduces over the tp group are counted in ``extra["tp_all_reduce_bytes_fwd"]`` (after
    row-parallel matmuls) and ``["tp_all_reduce_bytes_bwd"]`` (gradients entering
    column-parallel regions), its all-gathers and reduce-scatters (sequence parallelism) in
    ``extra["tp_gather_bytes_fwd"]`` / ``["tp_gather_bytes_bwd"]`` (the whole tensor's bytes),
    with ``extra["tp_size"]``."""
    sz = _Sizes(to_expr)
    gm = seg.gm
    shipped = set(seg.shipped_params)
    param_names = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    chain_phs = [n for n in gm.graph.nodes if n.op == "placeholder"][: len(seg.chain_inputs)]
    requires_grad: dict[fx.Node, bool] = {}
    is_param: dict[fx.Node, bool] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            val = n.meta.get("val")
            floating = isinstance(val, torch.Tensor) and val.is_floating_point()
            requires_grad[n] = floating and n in chain_phs
            is_param[n] = n in chain_phs and n.name in {p.replace(".", "_") for p in shipped}
        elif n.op == "get_attr":
            requires_grad[n] = is_param[n] = n.target in param_names
        else:
            ins = n.all_input_nodes
            requires_grad[n] = any(requires_grad.get(a, False) for a in ins)
            is_param[n] = n.op == "call_function" and n.target in VIEWS and bool(ins) and is_param.get(ins[0], False)

    fwd = bwd_in = bwd_w = attn_f = attn_b = tp_fwd = tp_bwd = sympy.Integer(0)
    gather_fwd = gather_bwd = sympy.Integer(0)
    attn_frac: list[tuple[sympy.Expr, sympy.Expr]] = []  # (dense FLOPs, fraction computed) per attention
    saved: dict[fx.Node, sympy.Expr] = {}  # base node -> bytes kept for backward (policy none)

    def save(n):
        if isinstance(n, fx.Node) and not is_param.get(n, False) and n.op != "get_attr":
            b = _base(n)
            saved.setdefault(b, sz.nbytes(b))

    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        t = n.target
        if t is tp_reduce:
            tp_fwd += sz.nbytes(n)
        elif t is tp_copy and requires_grad.get(n, False):
            tp_bwd += sz.nbytes(n)
        elif t in (sp_all_gather, sp_gather):  # the whole tensor is the output
            gather_fwd += sz.nbytes(n)
            if t is sp_all_gather and requires_grad.get(n, False):
                gather_bwd += sz.nbytes(n)
        elif t in (sp_reduce_scatter, sp_split):  # the whole tensor is the input
            gather_fwd += sz.nbytes(n.args[0]) if t is sp_reduce_scatter else 0
            gather_bwd += sz.nbytes(n.args[0]) if requires_grad.get(n, False) else 0
        if t in (aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default, aten.bmm.default):
            if t == aten.addmm.default:
                a, b = n.args[1], n.args[2]
            else:
                a, b = n.args[0], n.args[1]
            sa, sb = sz.shape(a), sz.shape(b)
            if t == aten.linear.default:
                k, nn_ = sb[-1], sb[0]
                m = _prod(sa[:-1])
                flops = 2 * m * nn_ * k
            else:
                k, nn_ = sa[-1], sb[-1]
                batch = _prod(sz.shape(n)[:-2]) if len(sz.shape(n)) > 2 else sympy.Integer(1)
                m = sa[-2] if len(sa) >= 2 else sympy.Integer(1)
                flops = 2 * batch * m * nn_ * k
            fwd += flops
            for operand, other in ((a, b), (b, a)):
                if requires_grad.get(operand, False):
                    if is_param.get(operand, False):
                        bwd_w += flops
                    else:
                        bwd_in += flops
                    save(other)
        elif t == HELIX_ATTENTION:
            q, k, v = n.args[:3]
            bq, hq, sq, d = sz.shape(q)
            sk = sz.shape(k)[2]
            f = 4 * bq * hq * sq * sk * d
            fwd += f
            attn_f += f
            bwd_in += 2 * f
            attn_b += 2 * f
            attn_frac.append((f, attention_computed_fraction(sq, sk, n.kwargs.get("causal", False),
                                                             n.kwargs.get("window"), document_lengths)))
            for x in (q, k, v):
                save(x)
            lse_item = 4 if q.meta["val"].dtype in (torch.float16, torch.bfloat16) else q.meta["val"].element_size()
            saved.setdefault(n, sz.nbytes(q) + bq * hq * sq * lse_item)  # out + lse
        elif t in CHUNKED_MLPS:
            f_in, f_out, saved_mlp = _chunked_mlp_cost(n, sz)
            x_grad = requires_grad.get(n.args[0], False)
            fwd += f_in + f_out
            bwd_w += f_in + f_out
            bwd_in += f_out + (f_in if x_grad else 0)
            save(n.args[0])
            if n.kwargs.get("recompute", True):  # the backward reruns each chunk's forward first
                bwd_in += f_in + f_out
            else:  # ordinary autograd per chunk: the unchunked MLP's saved intermediates
                saved.setdefault(("mlp_chunk", n), saved_mlp)
        elif not requires_grad.get(n, False):
            continue
        elif t == aten.layer_norm.default:
            save(n.args[0])
            stat = 8 if n.meta["val"].dtype == torch.float64 else 4  # mean, rstd (accumulation dtype)
            saved.setdefault(("layer_norm_stats", n), _prod(sz.shape(n)[:-1]) * 2 * stat)  # not keyed by n: its output may be saved too
        elif t in POINTWISE_SAVE_INPUT:
            save(n.args[0])
        elif t in POINTWISE_SAVE_OUTPUT:
            save(n)
        elif t in (aten.mul.Tensor, aten.div.Tensor):
            a = n.args[0]
            b = n.args[1] if len(n.args) > 1 else None
            if isinstance(b, fx.Node):
                if requires_grad.get(b, False):
                    save(a)
                if requires_grad.get(a, False) or t == aten.div.Tensor:
                    save(b)
        elif t in (aten.softmax.int, aten._softmax.default):
            save(n)
        elif t in (aten.cross_entropy_loss.default, vocab_parallel_cross_entropy):
            saved.setdefault(n, sz.nbytes(n.args[0]))  # (log-)softmax of the (rank's) logits
    act_in = sympy.Integer(0)
    for ph in chain_phs:
        if not is_param.get(ph, False):
            act_in += sz.nbytes(ph)
    shipped_in = sum((sz.nbytes(ph) for ph in chain_phs if is_param.get(ph, False)), sympy.Integer(0))
    none_bytes = sum(saved.values(), sympy.Integer(0))
    attn_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == HELIX_ATTENTION]
    out_lse = sum((saved.get(n, 0) for n in attn_nodes), sympy.Integer(0))
    kind = seg.spec.kind
    boundary = act_in + shipped_in
    rules = {pol: policy_for(pol, kind) for pol in POLICIES}  # the one policy table (ir.recompute)
    saved_bytes = {pol: r.saved(all=none_bytes, inputs=boundary, attention=out_lse) for pol, r in rules.items()}
    outs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    held, rerun, out_new = _runtime_memory(rules, sz, chain_phs, saved, attn_nodes,
                                           [] if seg.spec.kind == "head" else outs, is_param)
    recompute = {pol: r.rerun_flops(forward=fwd, attention=attn_f, zero=sympy.Integer(0))
                 for pol, r in rules.items()}
    out_bytes = sum((sz.nbytes(o) for o in outs), sympy.Integer(0)) if seg.spec.kind != "head" else sympy.Integer(0)
    ship_out = sum((sz.nbytes(o) for o in outs if o.op == "get_attr"), sympy.Integer(0))
    assert set(saved_bytes) == set(POLICIES)
    return SegmentCost(
        flops_fwd=sympy.expand(fwd), flops_bwd=sympy.expand(bwd_in + bwd_w), flops_bwd_input=sympy.expand(bwd_in),
        flops_bwd_weight=sympy.expand(bwd_w), attention_flops_fwd=sympy.expand(attn_f),
        attention_flops_bwd=sympy.expand(attn_b), recompute_flops={k: sympy.expand(v) for k, v in recompute.items()},
        saved_bytes={k: sympy.expand(v) for k, v in saved_bytes.items()},
        held_bytes=held, rerun_bytes=rerun, out_new_bytes=out_new,
        param_bytes=sympy.Integer(sum(param_bytes[p] for p in seg.params if p in owned_params)),
        out_bytes=sympy.expand(out_bytes), shipped_param_bytes=sympy.expand(ship_out),
        extra={**_fraction_extra(attn_frac, always=document_lengths is not None),
               **({"tp_size": tensor_parallel, "tp_all_reduce_bytes_fwd": sympy.expand(tp_fwd),
                   "tp_all_reduce_bytes_bwd": sympy.expand(tp_bwd), "tp_gather_bytes_fwd": sympy.expand(gather_fwd),
                   "tp_gather_bytes_bwd": sympy.expand(gather_bwd)} if tensor_parallel > 1 else {})})
