"""Pass: canonicalize every attention into ``helix::attention(q, k, v, *, causal, scale)``.

Recognized forms:
* ``aten.scaled_dot_product_attention`` with no mask, ``is_causal=True``, or a materialized
  mask that is causal (what Hugging Face models pass);
* explicit ``matmul(q, k^T) -> scale -> mask -> softmax -> [dropout p=0] -> matmul(., v)``;
* GQA through ``repeat_kv`` (unsqueeze/expand/reshape), ``repeat_interleave`` or
  ``enable_gqa=True``: the repeat is peeled off, the op takes the K/V heads as they are.

A mask is accepted when it depends on shapes only and equals the causal pattern at probe
sizes (it is evaluated there); its s x s subgraph is then dead and removed. Any other mask is
rejected with an error naming the node.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from ..errors import UnsupportedModelError
from ..ir import meta
from ..kernels import attention as _attention_op  # noqa: F401  (registers helix::attention)
from . import PassResult
from .data_independence import find_data_independent

aten = torch.ops.aten
HELIX_ATTENTION = torch.ops.helix.attention.default

SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL = {aten.matmul.default, aten.bmm.default}
PASSTHROUGH = {aten.to.dtype, aten.type_as.default, aten.contiguous.default, aten.clone.default,
               aten.alias.default, aten._to_copy.default, aten.to.dtype_layout}
PROBE_SEQS = (5, 9)


def _args(node: fx.Node) -> dict:
    """Arguments by schema name (positional and keyword)."""
    schema = node.target._schema
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _shape(node) -> tuple:
    return tuple(node.meta["val"].shape)


def _peel(node: fx.Node) -> fx.Node:
    """Skip casts/copies and no-op slices (as in ``x[:, :, None, :, :]``)."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target in PASSTHROUGH and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        elif node.target == aten.slice.Tensor and _shape(node) == _shape(node.args[0]):
            node = node.args[0]
        else:
            break
    return node


def _peel_repeat_kv(node: fx.Node) -> fx.Node:
    """``reshape(expand(unsqueeze(x, 2)))`` or ``repeat_interleave(x, r, 1)`` -> x."""
    n = _peel(node)
    if n.op != "call_function":
        return node
    if n.target == aten.repeat_interleave.self_int and (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")) == 1:
        return n.args[0]
    if n.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        e = _peel(n.args[0])
        if e.op == "call_function" and e.target == aten.expand.default:
            u = _peel(e.args[0])
            if u.op == "call_function" and u.target == aten.unsqueeze.default and u.args[1] == 2:
                base = u.args[0]
                bs, es = _shape(base), _shape(e)
                if len(bs) == 4 and len(es) == 5 and es[1] == bs[1]:
                    return base
    return node


class _MaskProbe:
    """Evaluates shape-only mask subgraphs at small concrete sizes."""

    def __init__(self, gm: fx.GraphModule, independent: set[fx.Node]):
        self.gm, self.independent = gm, independent
        ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
        b, s = (d.node.expr for d in ph[0].meta["val"].shape)
        self.b_sym, self.s_sym = b, s

    def evaluate(self, mask: fx.Node, seq: int) -> torch.Tensor:
        env = {self.b_sym: 1, self.s_sym: seq}
        g = fx.Graph()
        remap: dict[fx.Node, fx.Node] = {}
        inputs: list[torch.Tensor] = []
        for n in self._ancestors(mask):
            if n.op == "placeholder":
                val = n.meta["val"]
                shape = [int(d.node.expr.xreplace(env)) if isinstance(d, torch.SymInt) else int(d) for d in val.shape]
                inputs.append(torch.zeros(shape, dtype=val.dtype))
                remap[n] = g.placeholder(n.name)
            else:
                kwargs = {k: (torch.device("cpu") if k == "device" else v) for k, v in n.kwargs.items()}
                new = g.create_node(n.op, n.target, fx.map_arg(n.args, lambda a: remap[a]),
                                    fx.map_arg(kwargs, lambda a: remap[a]), n.name)
                remap[n] = new
        g.output(remap[mask])
        probe = fx.GraphModule(self.gm, g)
        with torch.no_grad():
            out = probe(*inputs)
        if out.device.type == "meta":
            raise UnsupportedModelError(f"mask {mask.format_node()} is built from meta-device buffers and "
                                        f"cannot be checked; build the model with real buffers")
        return out

    def _ancestors(self, node: fx.Node) -> list[fx.Node]:
        seen: set[fx.Node] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        return [n for n in self.gm.graph.nodes if n in seen]

    def is_causal(self, mask: fx.Node, kind: str) -> bool:
        """kind: 'keep' (True = attend), 'drop' (True = masked out), 'additive' (0 / very negative)."""
        if mask not in self.independent:
            return False
        for seq in PROBE_SEQS:
            m = self.evaluate(mask, seq)
            tril = torch.ones(seq, seq, dtype=torch.bool).tril()
            if m.dim() < 2 or tuple(m.shape[-2:]) != (seq, seq):
                return False
            if kind == "keep":
                ok = m.dtype == torch.bool and bool((m == tril).all())
            elif kind == "drop":
                ok = m.dtype == torch.bool and bool((m == ~tril).all())
            else:
                if m.dtype == torch.bool:
                    ok = bool((m == tril).all())  # SDPA: a bool mask means keep
                else:
                    ok = bool((m.masked_select(tril.expand_as(m)) == 0).all()) and bool(
                        (m.masked_select(~tril.expand_as(m)) <= -1e4).all())
            if not ok:
                return False
        return True


def _reject_mask(node: fx.Node, why: str):
    raise UnsupportedModelError(
        f"attention at {node.format_node()} uses a mask helix_compiler cannot pipeline ({why}). "
        f"Only causal masks (or none) are supported: drop attention_mask/padding from the inputs "
        f"or pack sequences without padding")


def _match_sdpa(node: fx.Node, probe: _MaskProbe):
    a = _args(node)
    if float(a.get("dropout_p", 0.0) or 0.0) != 0.0:
        raise UnsupportedModelError(f"attention dropout p={a['dropout_p']} at {node.format_node()}: set the "
                                    f"attention dropout probability to 0")
    causal = bool(a.get("is_causal", False))
    mask = a.get("attn_mask")
    if mask is not None:
        if causal:
            _reject_mask(node, "both attn_mask and is_causal are set")
        if not probe.is_causal(mask, "additive"):
            _reject_mask(node, "the mask depends on input data or is not causal")
        causal = True
    q, k, v = a["query"], a["key"], a["value"]
    return q, _peel_repeat_kv(k), _peel_repeat_kv(v), causal, a.get("scale"), [node]


def _scalar(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _match_explicit(softmax: fx.Node, probe: _MaskProbe):
    """softmax(mask(scale * q @ k^T)) @ v, returning the matched pieces or None."""
    if softmax.args[1] not in (-1, len(_shape(softmax)) - 1):
        return None
    # forward: softmax -> casts/dropout -> matmul(p, v)
    p = softmax
    while len(p.users) == 1:
        (user,) = p.users
        if user.target in PASSTHROUGH:
            p = user
        elif user.target in (aten.dropout.default,):
            if float(user.args[1]) != 0.0 and user.args[2]:
                raise UnsupportedModelError(f"attention dropout p={user.args[1]} at {user.format_node()}: "
                                            f"set the attention dropout probability to 0")
            p = user
        else:
            break
    if len(p.users) != 1:
        return None
    (pv,) = p.users
    if pv.target not in MATMUL or pv.args[0] is not p:
        return None
    v = pv.args[1]
    # backward: softmax input -> casts -> mask -> scale -> matmul(q, k^T)
    x = _peel(softmax.args[0])
    causal = False
    scale = 1.0
    if x.target == aten.masked_fill.Scalar:
        fill = _scalar(x.args[2])
        if fill is None or fill > -1e4 or not probe.is_causal(x.args[1], "drop"):
            _reject_mask(x, "masked_fill with a non-causal mask")
        causal, x = True, _peel(x.args[0])
    elif x.target in (aten.where.self, aten.where.ScalarOther):
        fill = _scalar(x.args[2]) if x.target == aten.where.ScalarOther else None
        if fill is None or fill > -1e4 or not probe.is_causal(x.args[0], "keep"):
            _reject_mask(x, "where() with a non-causal mask")
        causal, x = True, _peel(x.args[1])
    elif x.target == aten.add.Tensor:
        a0, a1 = x.args
        mask, x = (a1, a0) if a1 in probe.independent else (a0, a1)
        if mask not in probe.independent or not probe.is_causal(mask, "additive"):
            _reject_mask(x, "an additive mask that depends on input data or is not causal")
        causal, x = True, _peel(x)
    while x.target in (aten.mul.Tensor, aten.div.Tensor) and _scalar(x.args[1]) is not None:
        c = _scalar(x.args[1])
        scale = scale * c if x.target == aten.mul.Tensor else scale / c
        x = _peel(x.args[0])
    if x.target not in MATMUL:
        return None
    q, kt = x.args
    kt = _peel(kt)
    if kt.target == aten.transpose.int and sorted(d % 4 for d in kt.args[1:3]) == [2, 3]:
        k = kt.args[0]
    else:
        return None
    while q.target == aten.mul.Tensor and _scalar(q.args[1]) is not None:  # q pre-scaled
        scale *= _scalar(q.args[1])
        q = _peel(q.args[0])
    if len(_shape(q)) != 4:
        return None
    return q, _peel_repeat_kv(k), _peel_repeat_kv(v), causal, scale, [pv]


def canonicalize_attention(gm: fx.GraphModule) -> PassResult:
    """Replace every attention with ``helix::attention``; returns info["count"]."""
    independent = find_data_independent(gm)
    probe = _MaskProbe(gm, independent)
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten.scaled_dot_product_attention.default:
            match = _match_sdpa(node, probe)
        elif node.target in SOFTMAX:
            match = _match_explicit(node, probe)
            if match is None:
                continue
        else:
            continue
        q, k, v, causal, scale, (result,) = match
        if scale is None:
            scale = 1.0 / math.sqrt(_shape(q)[-1])
        with graph.inserting_before(result):
            op = graph.call_function(HELIX_ATTENTION, (q, k, v), {"causal": causal, "scale": float(scale)})
            out = graph.call_function(operator.getitem, (op, 0))
        op.meta.update(nn_module_stack=result.meta.get("nn_module_stack", {}), stack_trace=result.meta.get("stack_trace"))
        op.meta[meta.ATTENTION_CAUSAL] = causal
        qv, vv = q.meta["val"], v.meta["val"]
        lse_dtype = torch.float32 if qv.dtype in (torch.float16, torch.bfloat16) else qv.dtype
        op.meta["val"] = (qv.new_empty((*qv.shape[:3], vv.shape[-1])), qv.new_empty(qv.shape[:3], dtype=lse_dtype))
        out.meta["val"] = op.meta["val"][0]
        out.meta["nn_module_stack"] = op.meta["nn_module_stack"]
        result.replace_all_uses_with(out)
        graph.erase_node(result)
        count += 1
    # Attention-probability dropout (p=0) is "impure" to fx's DCE; once its matmul is gone it
    # is dead all the same.
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output") or (
        n.op == "call_function" and n.target != aten.dropout.default and n.is_impure()))
    graph.lint()
    gm.recompile()
    return PassResult(gm, count > 0, {"count": count})
