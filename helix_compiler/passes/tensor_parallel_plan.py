"""Analysis: the Megatron tensor-parallel layout of a captured model, per parameter.

The first half of tensor parallelism inside the stages (the rewrite that inserts the
collectives builds on it): which weights are split how over ``tp`` ranks, and the shard each
rank holds. Per layer, from the tagged graph:

* the matmuls whose results reach the attention's q/k/v (fused or not) are column-parallel:
  each rank computes ``heads / tp`` query heads and their K/V heads;
* the first matmul after the attention (the output projection) is row-parallel;
* of the MLP's matmuls, one whose result feeds another matmul of the layer (gate, up, fc) is
  column-parallel, one whose result does not (down, proj) is row-parallel;
* with ``vocab_parallel``, the token embedding and the head's weight are split by vocabulary
  rows (the head column-parallel: each rank computes its slice of the logits);
* everything else (norms, the row-parallel matmuls' biases, and without ``vocab_parallel``
  the embedding and head) is replicated; the plan states what that costs per rank.

GQA: K/V heads are split when ``tp`` divides their number; with fewer K/V heads than ranks
(``tp % kv_heads == 0``) each K/V head is replicated on ``tp / kv_heads`` ranks, as Megatron
does; anything else is rejected with the head counts named. A weight is stored ``[out, in]``
for ``linear`` and ``[in, out]`` for ``addmm`` / ``mm`` (Hugging Face's Conv1D); column
parallelism splits the ``out`` dimension, row parallelism the ``in`` one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import HelixError, UnsupportedModelError
from ..ir import meta

aten = torch.ops.aten
HELIX_ATTENTION = torch.ops.helix.attention.default
WEIGHT_OUT_DIM = {aten.linear.default: 0, aten.addmm.default: 1, aten.mm.default: 1}  # [out, in] vs [in, out]


@dataclass(frozen=True)
class ParamShard:
    name: str  # the user's parameter name
    layer: int | None
    role: str  # column q | column k/v | column fused qkv | row attention-out | column mlp-in | row mlp-out | replicated
    shape: tuple[int, ...]
    shard: tuple[int, ...]  # what one tp rank holds

    @property
    def split_dim(self) -> int | None:
        diff = [d for d, (a, b) in enumerate(zip(self.shape, self.shard, strict=True)) if a != b]
        return diff[0] if diff else None


@dataclass(frozen=True)
class TensorParallelPlan:
    tp: int
    heads: int
    kv_heads: int
    kv_replicas: int  # ranks holding each K/V head (1: K/V heads split like Q heads)
    params: tuple[ParamShard, ...]

    def bytes_per_rank(self, element_size: int = 2) -> tuple[int, int]:
        """(sharded, replicated) parameter bytes one tp rank holds."""
        sharded = sum(_numel(p.shard) for p in self.params if p.role != "replicated")
        replicated = sum(_numel(p.shard) for p in self.params if p.role == "replicated")
        return sharded * element_size, replicated * element_size

    def describe(self) -> str:
        kv = (f"{self.kv_heads // self.tp} K/V heads per rank" if self.kv_replicas == 1 else
              f"each of the {self.kv_heads} K/V heads replicated on {self.kv_replicas} ranks")
        lines = [f"tensor parallel plan, tp={self.tp}: {self.heads // self.tp} of {self.heads} query heads per "
                 f"rank, {kv}",
                 f"{'parameter':<52} {'layer':>5}  {'role':<18} {'shape':>16} -> shard"]
        for p in self.params:
            lines.append(f"{p.name:<52} {'' if p.layer is None else p.layer:>5}  {p.role:<18} "
                         f"{str(list(p.shape)):>16} -> {list(p.shard)}")
        sharded, replicated = self.bytes_per_rank(4)
        lines.append(f"per tp rank (fp32): {sharded / 2**20:.2f} MiB sharded, {replicated / 2**20:.2f} MiB "
                     f"replicated (norms, biases after row-parallel matmuls"
                     f"{'' if any(p.role.endswith('vocab head') for p in self.params) else ', embedding and head'})")
        return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _weight(node: fx.Node) -> fx.Node | None:
    """The parameter a matmul multiplies by (``linear``'s weight, ``addmm``/``mm``'s right)."""
    if node.op != "call_function" or node.target not in WEIGHT_OUT_DIM:
        return None
    w = node.args[1] if node.target == aten.linear.default else node.args[-1]
    while isinstance(w, fx.Node) and w.op == "call_function" and w.target in (aten.t.default, aten.permute.default):
        w = w.args[0]
    return w if isinstance(w, fx.Node) and w.op == "get_attr" else None


def _bias(node: fx.Node) -> fx.Node | None:
    if node.target == aten.linear.default and len(node.args) > 2 and isinstance(node.args[2], fx.Node):
        return node.args[2]
    if node.target == aten.addmm.default and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _reaches(src: fx.Node, targets: set[fx.Node]) -> bool:
    """Does ``src``'s value flow into one of ``targets`` (or is it one)?"""
    if src in targets:
        return True
    seen, stack = set(), list(src.users)
    while stack:
        n = stack.pop()
        if n in targets:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.users)
    return False


def plan_tensor_parallel(gm: fx.GraphModule, tp: int, user_fqn=lambda n: n, *,
                         vocab_parallel: bool = False) -> TensorParallelPlan:
    """The layout of ``gm`` (a captured graph after ``tag_layers``) over ``tp`` ranks.
    ``vocab_parallel``: the token embedding and the head split by vocabulary rows too."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise HelixError(f"tp={tp!r} must be a positive integer")
    attentions = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == HELIX_ATTENTION]
    if not attentions:
        raise HelixError("plan_tensor_parallel needs a canonical graph (helix::attention nodes)")
    heads = int(attentions[0].args[0].meta["val"].shape[1])
    kv_heads = int(attentions[0].args[1].meta["val"].shape[1])
    if heads % tp:
        raise UnsupportedModelError(f"tp={tp} does not divide the {heads} query heads; use a tp that divides "
                                    f"{heads}")
    if kv_heads % tp and tp % kv_heads:
        raise UnsupportedModelError(f"tp={tp} and the {kv_heads} K/V heads: neither divides the other, so the "
                                    f"K/V heads can be neither split nor replicated evenly; use a tp that "
                                    f"divides {kv_heads} or a multiple of it that divides {heads}")
    kv_replicas = 1 if kv_heads % tp == 0 else tp // kv_heads
    planned: dict[str, ParamShard] = {}
    matmuls = [n for n in gm.graph.nodes if _weight(n) is not None]
    for layer, attn in enumerate(attentions, start=1):
        mine = [n for n in matmuls if n.meta.get(meta.LAYER) == layer]
        qkv = set(attn.args[:3])
        pre = [n for n in mine if _reaches(n, qkv)]  # (the cut may have moved them to the attention stage)
        post = [n for n in mine if n not in pre]
        for n in pre:
            kind = _projection(n, attn)
            if kind == "fused" and kv_replicas > 1:
                raise UnsupportedModelError(
                    f"layer {layer}: the fused q/k/v weight {_weight(n).target} with its {kv_heads} K/V heads "
                    f"replicated over {kv_replicas} ranks is not planned; use a tp that divides {kv_heads}")
            role = {"q": "column q", "kv": "column k/v", "fused": "column fused qkv"}[kind]
            _shard(planned, n, layer, role, tp // kv_replicas if kind == "kv" else tp)
        if not post:
            raise UnsupportedModelError(f"layer {layer}: no matmul after its attention {attn.format_node()} "
                                        f"(the output projection) to make row-parallel")
        _shard(planned, post[0], layer, "row attention-out", tp)
        mlp = set(post[1:])
        for n in post[1:]:
            feeds = _reaches(n, mlp - {n})
            _shard(planned, n, layer, "column mlp-in" if feeds else "row mlp-out", tp)
    if vocab_parallel:
        _plan_vocabulary(gm, planned, tp)
    out: dict[str, ParamShard] = {}
    seen: set[int] = set()  # a tied weight is planned once, under its first name
    by_object = {id(gm.get_parameter(name)): got for name, got in planned.items()}  # (under any of its names)
    for name, p in gm.named_parameters(remove_duplicate=False):
        fqn = user_fqn(name)
        if id(p) not in seen:
            seen.add(id(p))
            got = by_object.get(id(p))
            shape = tuple(p.shape)
            out[fqn] = (ParamShard(fqn, got.layer, got.role, got.shape, got.shard) if got is not None
                        else ParamShard(fqn, None, "replicated", shape, shape))
    return TensorParallelPlan(tp, heads, kv_heads, kv_replicas, tuple(out.values()))


def _plan_vocabulary(gm: fx.GraphModule, planned: dict[str, ParamShard], tp: int) -> None:
    """Split the token embedding (the table ``input_ids`` index) and the head's weight by
    vocabulary rows (the head column-parallel: each rank computes its slice of the logits)."""
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder")
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target == aten.embedding.default and n.args[0].op == "get_attr" and depends_on(n.args[1], ids):
            w = n.args[0]
            shape = tuple(gm.get_parameter(w.target).shape)
            _check_vocabulary(w.target, shape[0], tp)
            planned[w.target] = ParamShard(w.target, None, "vocab embedding", shape, (shape[0] // tp, *shape[1:]))
        elif n.meta.get(meta.ROLE) == "head" and _weight(n) is not None:
            w = _weight(n)
            shape = tuple(gm.get_parameter(w.target).shape)
            _check_vocabulary(w.target, shape[WEIGHT_OUT_DIM[n.target]], tp)
            _shard(planned, n, None, "column vocab head", tp)


def _check_vocabulary(name: str, rows: int, tp: int) -> None:
    if rows % tp:
        raise UnsupportedModelError(
            f"the vocabulary of {name} ({rows} rows) does not split over tp={tp}: pad it to a multiple of "
            f"{tp} (e.g. Hugging Face's model.resize_token_embeddings({-(-rows // tp) * tp})) or pass "
            f"vocab_parallel=False (embedding and head replicated: every tp rank computes the whole logits)")


def depends_on(node, source) -> bool:
    """Does ``node``'s value come from ``source`` (through any chain of inputs)?"""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is source:
            return True
        if isinstance(n, fx.Node) and n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


def _projection(node: fx.Node, attn: fx.Node) -> str:
    """Which attention inputs a pre-attention matmul computes: "q", "kv" or "fused" (several,
    as GPT's c_attn)."""
    q, k, v = attn.args[:3]
    hits = {name for name, x in (("q", q), ("k", k), ("v", v)) if _reaches(node, {x})}
    if len(hits) > 1:
        return "fused"
    return "q" if hits == {"q"} else "kv"


def _shard(planned: dict[str, ParamShard], node: fx.Node, layer: int, role: str, ranks: int) -> None:
    """Split ``node``'s weight ``ranks`` ways (column: its out features; row: its in features)
    and, for a column-parallel matmul, its bias alike."""
    w = _weight(node)
    shape = tuple(node.graph.owning_module.get_parameter(w.target).shape)
    out_dim = WEIGHT_OUT_DIM[node.target] if len(shape) == 2 else 0
    dim = out_dim if role.startswith("column") else 1 - out_dim
    if shape[dim] % ranks:
        raise UnsupportedModelError(f"{'head' if layer is None else f'layer {layer}'}: {w.target} {list(shape)} "
                                    f"cannot be split {ranks} ways along "
                                    f"dimension {dim} ({role}); use a tp that divides {shape[dim]}")
    shard = tuple(s // ranks if d == dim else s for d, s in enumerate(shape))
    planned[w.target] = ParamShard(w.target, layer, role, shape, shard)
    bias = _bias(node)
    if bias is not None and bias.op == "get_attr" and role.startswith("column"):  # row: added after the sum
        b = tuple(node.graph.owning_module.get_parameter(bias.target).shape)
        planned[bias.target] = ParamShard(bias.target, layer, role, b, (b[0] // ranks,))
