"""Pass: tensor parallelism inside the stages, as a rewrite of the segment graphs.

Megatron's layout (planned per parameter by ``passes.tensor_parallel_plan``): the q/k/v and
gate/up (fc) projections are column-parallel, the attention-output and down (proj)
projections row-parallel, attention heads split over the ``tp`` ranks. Every rank runs the
same rewritten graph on its own shard of each split parameter:

* a placement is propagated through each segment in chain order (a tensor is replicated,
  or split along one dimension: ``ir.tensor_parallel.Sharded``), from the split
  parameters through the views, pointwise ops and the attention (heads) to the
  row-parallel matmul, whose partial products are summed;
* ``tp_copy`` (Megatron's f: identity forward, all-reduce backward) is inserted before each
  column-parallel region's input and ``tp_reduce`` (g: all-reduce forward) after each
  row-parallel matmul, whose bias is then added once;
* shape constants on a split dimension (``view(x, [b, s, 32, 128])``, ``split(x, 4096)``)
  are divided by ``tp``, and every node's ``meta["val"]`` and each segment's boundary
  shapes become the per-rank ones, so the cost model, the simulator and the receive buffers
  see what one rank holds: boundary tensors inside a parallel region (q/k/v and attention
  outputs crossing to another stage) travel as shards between the ranks with the same tp
  index, shipped q/k/v weights as their owner's shards.

Sequence parallelism (``sequence_parallel=True``, Megatron's, as HelixPipe's own runs use):
between the parallel regions activations are split along the sequence instead of
replicated. The f before a column-parallel matmul becomes ``sp_all_gather`` (all-gather of
the sequence; backward reduce-scatter), the g after a row-parallel one ``sp_reduce_scatter``;
norms, residual adds and dropout run on the rank's part of the sequence, and the tensors
crossing stages outside the regions (the residual stream, the shipped LN1 output) travel
as sequence parts, each to the rank of the same tp index, which gathers the sequence
inside its own group before the QKV GEMM. Where a split tensor meets one every rank holds
whole (the first layer's residual, which starts from the replicated embedding; learned
positions), ``sp_split`` takes the rank's part; the head gathers the sequence
(``sp_gather``) and computes the loss on every rank. Parameters held whole but used on a
rank's part of the activations (norm weights, the biases after row-parallel matmuls) get
partial gradients, summed over the tp group after the backward half
(``TensorParallelProgram.partial_grads``); a parameter used both ways is rejected. Sequence
parallelism needs micro batches of one sequence (``[b, s, h]`` with ``b = 1``: the
flattened ``[b*s, h]`` rows of a matmul are then the sequence).

Vocabulary parallelism (``vocab_parallel=True``, the default with tp): the token embedding
and the head are split by vocabulary rows. The embedding becomes ``vocab_parallel_embedding``
(each rank looks up its rows) followed by the same g as a row-parallel matmul; the head is
column-parallel (its slice of the logits) and the loss ``vocab_parallel_cross_entropy``,
so that no rank holds whole logits. Without it both are replicated and the head's input is
gathered (``sp_gather``) for it.

Without sequence parallelism, activations outside the parallel regions are replicated on the tp ranks
(norms, residual adds, embedding and head are computed on each rank). Anything the
propagation does not know with a split input is rejected with the op named, never computed
on the wrong shard.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from ..errors import UnsupportedModelError
from ..ir.segment import B, S
from ..ir.tensor_parallel import SeqSplit, Sharded
from ..kernels.tensor_parallel import (
    sp_all_gather,
    sp_gather,
    sp_reduce_scatter,
    sp_split,
    tp_copy,
    tp_reduce,
    vocab_parallel_cross_entropy,
    vocab_parallel_embedding,
)

aten = torch.ops.aten
HELIX_ATTENTION = torch.ops.helix.attention.default
GROUP_KEY = "tp"
# sizes the symbolic dimensions are probed at (a large prime times 64 cannot collide with
# hidden sizes and splits over up to 64 ranks); sequence parallelism runs micro batches of one
# sequence
_PROBE = {B: 3, S: 1031 * 64}
_PROBE_SP = {B: 1, S: 1031 * 64}

PASS_THROUGH = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
                aten.contiguous.default, aten.alias.default, aten.detach.default, aten.dropout.default,
                aten.lift_fresh_copy.default}
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}


@dataclass
class TensorParallelProgram:
    """What the rewrite decided: the split of every split parameter (by its name in the
    captured graph) and of every boundary value (by chain name)."""

    tp: int
    group_key: str
    sequence_parallel: bool = False
    vocab_parallel: bool = False
    param_shards: dict[str, Sharded] = field(default_factory=dict)
    boundary: dict[str, Sharded] = field(default_factory=dict)
    collectives: int = 0
    # parameters held whole whose gradient each tp rank computes a part of (captured names)
    partial_grads: set[str] = field(default_factory=set)
    # id(parameter) -> (name, {"part", "whole"}): how the graphs use each parameter held whole
    uses: dict[int, tuple[str, set[str]]] = field(default_factory=dict, repr=False)

    def local_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        sh = self.param_shards.get(name)
        if sh is None:
            return tuple(shape)
        return tuple(sh.local_size(d, self.tp) if k == sh.dim else d for k, d in enumerate(shape))


def shard_segments(segments, *, tp: int, plan, user_fqn, to_expr, params: dict[str, torch.Tensor],
                   sequence_parallel: bool = False, vocab_parallel: bool = False) -> TensorParallelProgram:
    """Rewrite every segment's graph (in place) for ``tp`` tensor-parallel ranks. ``params``:
    every name of every parameter of the captured graph (a tied weight under each of its)."""
    if plan.kv_replicas > 1:
        raise UnsupportedModelError(
            f"tp={tp} with {plan.kv_heads} K/V heads: each K/V head would be replicated on {plan.kv_replicas} "
            f"ranks, which the tensor-parallel rewrite does not do yet; use a tp that divides {plan.kv_heads}")
    by_fqn = {p.name: p for p in plan.params}  # (a tied weight under its first name only)
    out = TensorParallelProgram(tp, GROUP_KEY, sequence_parallel, vocab_parallel)
    named = [(n, p) for seg in segments for n, p in seg.gm.named_parameters(remove_duplicate=False)]
    by_object = {id(p): by_fqn[user_fqn(n)] for n, p in params.items() if user_fqn(n) in by_fqn}
    for name, param in named:
        p = by_object.get(id(param))
        if p is not None and p.role != "replicated":
            out.param_shards[name] = Sharded(p.split_dim, 3 if "fused" in p.role else 1)
    for seg in segments:
        _Rewrite(seg, out, to_expr).run()
    for name, kinds in out.uses.values():
        if kinds == {"part", "whole"}:
            raise UnsupportedModelError(
                f"tensor parallelism (tp={tp}): parameter {user_fqn(name)} is used both on every rank's whole "
                f"activations and on each rank's part of them, so its gradient would be neither whole nor a "
                f"part on each rank" + ("; try sequence_parallel=False" if sequence_parallel else ""))
        if kinds == {"part"}:
            out.partial_grads.add(name)
    return out


class _Rewrite:
    def __init__(self, seg, result: TensorParallelProgram, to_expr):
        self.seg, self.gm, self.result, self.tp = seg, seg.gm, result, result.tp
        self.to_expr = to_expr
        self.place: dict[fx.Node, object] = {}  # node -> None | Sharded | list of those (tuple outputs)
        self.copies: dict[tuple, fx.Node] = {}  # (collective, input) -> the inserted node
        self.sp = result.sequence_parallel
        self.probe = _PROBE_SP if self.sp else _PROBE
        self.params = {n for n, _ in self.gm.named_parameters(remove_duplicate=False)}

    def fail(self, node: fx.Node, why: str):
        raise UnsupportedModelError(
            f"tensor parallelism (tp={self.tp}), segment {self.seg.name}: {node.format_node()}: {why}")

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        graph = self.gm.graph
        phs = [n for n in graph.nodes if n.op == "placeholder"]
        chain = dict(zip(phs, self.seg.chain_inputs, strict=False))
        for node in list(graph.nodes):
            if node.op == "placeholder":
                self.place[node] = self.result.boundary.get(chain.get(node))
            elif node.op == "get_attr":
                self.place[node] = self.result.param_shards.get(node.target)
            elif node.op == "call_function":
                self.place[node] = self.visit(node)
            elif node.op == "output":
                outs = node.args[0]
                for name, o in zip(self.seg.chain_outputs, outs, strict=True):
                    p = self.place.get(o) if isinstance(o, fx.Node) else None
                    if isinstance(p, list):
                        self.fail(o, "a tuple crosses a stage boundary")
                    if p is not None:
                        self.result.boundary[name] = p
                    else:
                        self.result.boundary.pop(name, None)
        for node in graph.nodes:
            p = self.place.get(node)
            if p is not None:
                node.meta["val"] = self.local_val(node.meta.get("val"), p)
        self.seg.input_meta = [self.local_meta(m, self.result.boundary.get(n))
                               for n, m in zip(self.seg.chain_inputs, self.seg.input_meta, strict=True)]
        self.seg.output_meta = [self.local_meta(m, self.result.boundary.get(n))
                                for n, m in zip(self.seg.chain_outputs, self.seg.output_meta, strict=True)]
        graph.lint()
        self.gm.recompile()

    def local_val(self, val, p):
        if isinstance(p, list):
            return type(val)(self.local_val(v, q) for v, q in zip(val, p, strict=True))
        if p is None or not isinstance(val, torch.Tensor):
            return val
        return val.narrow(p.dim, 0, val.shape[p.dim] // self.tp)

    def local_meta(self, meta, p):
        if p is None:
            return meta
        shape, dtype = meta
        return tuple(sympy.sympify(d) / self.tp if k == p.dim else d for k, d in enumerate(shape)), dtype

    # ------------------------------------------------------------------ helpers
    def concrete(self, node: fx.Node) -> list[int]:
        return [int(sympy.sympify(self.to_expr(d)).subs(self.probe)) for d in node.meta["val"].shape]

    def ndim(self, node) -> int:
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        return val.dim() if isinstance(val, torch.Tensor) else 0

    def param_of(self, node) -> fx.Node | None:
        """The parameter (get_attr) ``node`` is a view of, if any."""
        while isinstance(node, fx.Node) and node.op == "call_function" and node.target in (
                PASS_THROUGH | RESHAPES | {aten.t.default, aten.permute.default, aten.expand.default}):
            node = node.args[0]
        return node if isinstance(node, fx.Node) and node.op == "get_attr" and node.target in self.params else None

    def use(self, param: fx.Node | None, kind: str) -> None:
        """Record that a parameter held whole is used on whole ("whole") or split ("part")
        activations."""
        if param is None or param.target in self.result.param_shards:
            return
        p = self.gm.get_parameter(param.target)
        self.result.uses.setdefault(id(p), (param.target, set()))[1].add(kind)

    def inputs(self, node: fx.Node) -> list[tuple[fx.Node, object]]:
        return [(a, self.place.get(a)) for a in node.all_input_nodes]

    def scale_arg(self, node: fx.Node, index: int, position: int) -> None:
        """Divide ``node.args[index][position]`` (a size on a split dimension) by tp: a
        constant in place, a size computed at run time (the sequence length read off an
        input) by a ``//`` node, unless it was read off a tensor split there already."""
        sizes = list(node.args[index])
        v = sizes[position]
        if isinstance(v, int):
            if v != -1:
                if v % self.tp:
                    self.fail(node, f"size {v} on the split dimension is not divisible by tp={self.tp}")
                sizes[position] = v // self.tp
        elif isinstance(v, fx.Node) and v.op == "call_function" and v.target == aten.sym_size.int:
            src, dim = v.args
            p = self.place.get(src)
            if p is not None and not isinstance(p, list) and p.dim == dim % self.ndim(src):
                return  # the size of the split tensor's own part
            with self.gm.graph.inserting_before(node):
                part = self.gm.graph.call_function(operator.floordiv, (v, self.tp))
            part.meta["val"] = v.meta["val"] // self.tp if "val" in v.meta else None
            sizes[position] = part
        else:
            self.fail(node, f"the size {v} on the split dimension is computed at run time in a way this pass "
                            f"cannot divide by tp")
        args = list(node.args)
        args[index] = sizes
        node.args = tuple(args)

    def collective(self, fn, x: fx.Node, *args, place=None) -> fx.Node:
        """``fn(x, *args, group)`` inserted after ``x`` (once per ``fn`` and ``x``)."""
        key = (fn, x, *args)
        if key not in self.copies:
            with self.gm.graph.inserting_after(x):
                c = self.gm.graph.call_function(fn, (x, *args, GROUP_KEY))
            c.meta["val"] = x.meta.get("val")
            self.copies[key] = c
            self.place[c] = place
            self.result.collectives += fn in (tp_copy, tp_reduce, sp_all_gather, sp_reduce_scatter, sp_gather)
        return self.copies[key]

    def whole_input(self, x: fx.Node, px) -> fx.Node:
        """``x`` as every rank's whole tensor for a column-parallel matmul: f (``tp_copy``) of a
        replicated input, the all-gather of a sequence-split one."""
        if px is None:
            return self.collective(tp_copy, x)
        return self.collective(sp_all_gather, x, px.dim)

    def reduce_after(self, node: fx.Node, bias) -> object:
        """``node`` (partial sums) -> g(node) [+ bias] for every user of ``node``: the sum over
        the group (``tp_reduce``), or under sequence parallelism its sequence part
        (``sp_reduce_scatter`` over the rows: the sequence, one sequence per micro batch)."""
        graph = self.gm.graph
        users = list(node.users)
        seq = self.ndim(node) - 2
        place = SeqSplit(seq) if self.sp else None
        with graph.inserting_after(node):
            red = (graph.call_function(sp_reduce_scatter, (node, seq, GROUP_KEY)) if self.sp
                   else graph.call_function(tp_reduce, (node, GROUP_KEY)))
        red.meta["val"] = node.meta.get("val")
        last = red
        if bias is not None:
            with graph.inserting_after(red):
                last = graph.call_function(aten.add.Tensor, (red, bias))
            last.meta["val"] = node.meta.get("val")
            self.use(self.param_of(bias), "part" if self.sp else "whole")
        for u in users:
            u.replace_input_with(node, last)
        self.place[red] = self.place[last] = place
        self.result.collectives += 1
        return place

    # ------------------------------------------------------------------ rules
    def visit(self, node: fx.Node):
        t = node.target
        ins = self.inputs(node)
        split = [(a, p) for a, p in ins if p is not None]
        if t in (aten.linear.default, aten.mm.default, aten.addmm.default):
            return self.matmul(node)
        if t == aten.embedding.default and self.place.get(node.args[0]) is not None:
            return self.embedding(node)
        if t == aten.cross_entropy_loss.default and self.place.get(node.args[0]) is not None:
            return self.cross_entropy(node)
        if t is HELIX_ATTENTION:
            return self.attention(node, split)
        if t is operator.getitem:
            src = node.args[0]
            p = self.place.get(src)
            return p[node.args[1]] if isinstance(p, list) else None
        if not split:
            for a in node.all_input_nodes:
                self.use(self.param_of(a), "whole")
            return None
        if any(isinstance(p, list) for _, p in split):
            self.fail(node, "a tuple-valued split input")
        x, p = node.args[0], split[0][1]
        nd = self.ndim(node)
        if t in PASS_THROUGH:
            return p
        if t == aten.sym_size.int:
            if node.args[1] % self.ndim(x) == p.dim:
                self.fail(node, "reads the size of the split dimension")
            return None
        if t == aten.layer_norm.default:
            normalized = len(node.args[1])
            if p.dim >= nd - normalized:
                self.fail(node, "normalizes over the split dimension")
            for a in node.args[2:4]:
                self.use(self.param_of(a), "part")
            return p
        if t in RESHAPES:
            return self.reshape(node, p)
        if t == aten.flatten.using_ints:  # a reshape whose sizes follow from its input's
            return self.reshape(node, p, sizes_in_args=False)
        if t == aten.expand.default:
            d = p.dim + (len(node.args[1]) - self.ndim(x))
            self.scale_arg(node, 1, d)
            return type(p)(d, p.groups)
        if t == aten.transpose.int:
            d0, d1 = (a % self.ndim(x) for a in node.args[1:3])
            return type(p)({d0: d1, d1: d0}.get(p.dim, p.dim), p.groups)
        if t == aten.t.default:
            return type(p)(1 - p.dim, p.groups)
        if t == aten.permute.default:
            dims = [a % nd for a in node.args[1]]
            return type(p)(dims.index(p.dim), p.groups)
        if t == aten.unsqueeze.default:
            u = node.args[1] % nd
            return type(p)(p.dim + (u <= p.dim), p.groups)
        if t == aten.squeeze.dim:
            s = node.args[1] % self.ndim(x)
            if s == p.dim:
                self.fail(node, "squeezes the split dimension")
            return type(p)(p.dim - (s < p.dim), p.groups)
        if t == aten.slice.Tensor:
            dim = node.args[1] % nd if len(node.args) > 1 else 0
            start = node.args[2] if len(node.args) > 2 else 0
            end = node.args[3] if len(node.args) > 3 else None
            step = node.args[4] if len(node.args) > 4 else 1
            if dim == p.dim and not (start in (0, None) and (end is None or end >= 2**62) and step == 1):
                self.fail(node, "slices the split dimension")
            return p
        if t == aten.select.int:
            dim = node.args[1] % self.ndim(x)
            if dim == p.dim:
                self.fail(node, "selects along the split dimension")
            return type(p)(p.dim - (dim < p.dim), p.groups)
        if t in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
            return self.split(node, p)
        if t == aten.cat.default:
            dim = (node.args[1] if len(node.args) > 1 else 0) % nd
            places = {self.place.get(a) for a in node.args[0]}
            if len(places) != 1 or dim == p.dim:  # (a replicated piece would need its part taken)
                self.fail(node, f"concatenates inputs split as {places} along dimension {dim}")
            return p
        if t in REDUCTIONS:
            dims = [d % self.ndim(x) for d in (node.args[1] if len(node.args) > 1 else range(self.ndim(x)))]
            keep = len(node.args) > 2 and node.args[2]
            if p.dim in dims:
                self.fail(node, "reduces over the split dimension")
            return type(p)(p.dim if keep else p.dim - sum(d < p.dim for d in dims), p.groups)
        if t in (aten._log_softmax.default, aten._softmax.default, aten.softmax.int, aten.log_softmax.int):
            if node.args[1] % nd == p.dim:
                self.fail(node, "normalizes over the split dimension")
            return p
        if isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags:
            return self.pointwise(node, split, nd)
        self.fail(node, f"input {split[0][0].name} is split ({split[0][1]}) and this op has no tensor-parallel rule")

    def pointwise(self, node: fx.Node, split, nd: int):
        aligned = {type(p)(p.dim + nd - self.ndim(a), p.groups) for a, p in split}
        if len(aligned) != 1:
            self.fail(node, f"inputs split differently: {sorted(map(str, aligned))}")
        (p,) = aligned
        for a in node.all_input_nodes:
            if self.place.get(a) is not None or not isinstance(a.meta.get("val"), torch.Tensor):
                continue
            k = p.dim - (nd - self.ndim(a))
            param = self.param_of(a)
            if k >= 0 and self.concrete(a)[k] != 1:
                if param is not None or not isinstance(p, SeqSplit):
                    self.fail(node, f"replicated input {a.name} has the full size on the split dimension {p.dim}")
                node.replace_input_with(a, self.collective(sp_split, a, k, place=SeqSplit(k)))
            self.use(param, "part")
        return p

    def reshape(self, node: fx.Node, p: Sharded, *, sizes_in_args: bool = True):
        src, dst = self.concrete(node.args[0]), self.concrete(node)
        for a_dims, b_dims in _reshape_groups(src, dst):
            if p.dim not in a_dims:
                continue
            if any(src[d] != 1 for d in a_dims[:a_dims.index(p.dim)]):
                self.fail(node, "merges the split dimension into an outer one")
            out = next(d for d in b_dims if dst[d] != 1)
            if p.groups > 1 and (len(a_dims) > 1 or len(b_dims) > 1):
                self.fail(node, f"reshapes a dimension split in {p.groups} blocks")
            if dst[out] % (self.tp * p.groups):
                self.fail(node, f"dimension {out} of size {dst[out]} does not split over tp={self.tp}")
            if sizes_in_args:
                self.scale_arg(node, 1, out)
            return type(p)(out, p.groups)
        raise AssertionError("reshape groups cover every dimension")

    def split(self, node: fx.Node, p: Sharded):
        nd_in = self.ndim(node.args[0])
        dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % nd_in
        pieces = len(node.meta["val"])
        if dim != p.dim:
            return [p] * pieces
        sizes = self.concrete(node.args[0])
        if p.groups != pieces:
            self.fail(node, f"splits the split dimension into {pieces} pieces; its shards follow {p.groups} "
                            f"block(s)")
        if node.target == aten.split.Tensor:
            if node.args[1] * pieces != sizes[dim]:
                self.fail(node, "unequal pieces of a dimension split in blocks")
            node.args = (node.args[0], node.args[1] // self.tp, *node.args[2:])
        elif node.target == aten.split_with_sizes.default:
            if len(set(node.args[1])) != 1:
                self.fail(node, "unequal pieces of a dimension split in blocks")
            node.args = (node.args[0], [s // self.tp for s in node.args[1]], *node.args[2:])
        return [Sharded(dim, 1)] * pieces

    def attention(self, node: fx.Node, split):
        q, k, v = node.args[:3]
        places = [self.place.get(x) for x in (q, k, v)]
        if not split:
            return None
        if any(pl != Sharded(1) for pl in places) or any(p is not None for a, p in split if a not in (q, k, v)):
            self.fail(node, f"q/k/v split as {[str(x) for x in places]}; the heads (dimension 1) of all three "
                            f"must be split")
        return [Sharded(1), Sharded(1)]

    def embedding(self, node: fx.Node):
        w, ids = node.args[:2]
        padding_idx = node.args[2] if len(node.args) > 2 else -1
        if self.place.get(w) != Sharded(0) or self.place.get(ids) is not None or any(node.args[3:5]):
            self.fail(node, "only a table split by rows, looked up by whole ids (no scale_grad_by_freq or sparse "
                            "gradients), is split by vocabulary")
        node.target, node.args = vocab_parallel_embedding, (w, ids, GROUP_KEY, padding_idx)
        self.reduce_after(node, None)
        return None  # the lookup's own output: this rank's rows, zeros for the others

    def cross_entropy(self, node: fx.Node):
        x, target = node.args[:2]
        names = [a.name for a in aten.cross_entropy_loss.default._schema.arguments]
        given = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
        if self.place.get(x) != Sharded(1) or self.ndim(x) != 2 or self.place.get(target) is not None:
            self.fail(node, "vocabulary-parallel cross-entropy takes [tokens, vocabulary] logits split by "
                            "vocabulary and whole targets")
        if given.get("weight") is not None or given.get("label_smoothing", 0.0):
            self.fail(node, "class weights or label smoothing in a vocabulary-parallel cross-entropy")
        node.target = vocab_parallel_cross_entropy
        node.args = (x, target, given.get("reduction", 1), given.get("ignore_index", -100), GROUP_KEY)
        node.kwargs = {}
        return None

    def matmul(self, node: fx.Node):
        t = node.target
        if t == aten.addmm.default:
            bias, x, w = node.args[:3]
        else:
            x, w = node.args[:2]
            bias = node.args[2] if t == aten.linear.default and len(node.args) > 2 else None
        px, pw = self.place.get(x), self.place.get(w)
        pb = self.place.get(bias) if isinstance(bias, fx.Node) else None
        out_dim = 0 if t == aten.linear.default else 1  # the weight's output-feature dimension
        nd = self.ndim(node)
        if pw is None:
            if isinstance(px, SeqSplit):  # the head: the whole sequence for work every rank repeats
                node.replace_input_with(x, self.collective(sp_gather, x, px.dim))
            elif px is not None:
                self.fail(node, "a split activation multiplied by a replicated weight")
            self.use(self.param_of(w), "whole")
            return None
        if pw.dim == out_dim:  # column-parallel: whole input, output features split
            if px is not None and not isinstance(px, SeqSplit):
                self.fail(node, f"column-parallel weight {w.name} on an input already split ({px})")
            if bias is not None and pb != Sharded(0, pw.groups):
                self.fail(node, f"the bias of column-parallel {w.name} is not split like its weight")
            node.replace_input_with(x, self.whole_input(x, px))
            return Sharded(nd - 1, pw.groups)
        # row-parallel: input features split, partial sums reduced over the group, bias added once
        if type(px) is not Sharded or px.dim != self.ndim(x) - 1 or pw.groups != 1:
            self.fail(node, f"row-parallel weight {w.name} needs its input split along the features, got {px}")
        if pb is not None:
            self.fail(node, "the bias of a row-parallel matmul is split")
        if bias is not None:
            if t == aten.addmm.default:
                node.target, node.args = aten.mm.default, (x, w)
            else:
                node.args = (x, w)
        self.reduce_after(node, bias)
        return None  # the matmul's own output: full-size partial sums


def _reshape_groups(src: list[int], dst: list[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of dimensions with equal products (``[b, s, 4096] -> [b, s, 32, 128]``:
    ``[0]->[0], [1]->[1], [2]->[2, 3]``); size-1 dimensions join the preceding run."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) and j < len(dst):
        a, b, pa, pb = [i], [j], src[i], dst[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                a.append(i)
                pa *= src[i]
                i += 1
            else:
                b.append(j)
                pb *= dst[j]
                j += 1
        groups.append((a, b))
    if not groups:
        groups.append(([], []))
    groups[-1][0].extend(range(i, len(src)))
    groups[-1][1].extend(range(j, len(dst)))
    return groups
