"""Pass: canonicalize every attention into ``helix::attention(q, k, v[, doc_ids], *, causal, scale[, window])``.

Recognized forms:
* ``aten.scaled_dot_product_attention`` with no mask, ``is_causal=True``, or a materialized
  mask that is causal or a causal sliding window (what Hugging Face models pass);
* explicit ``matmul(q, k^T) -> scale -> mask -> softmax -> [dropout p=0] -> matmul(., v)``;
* GQA through ``repeat_kv`` (unsqueeze/expand/reshape), ``repeat_interleave`` or
  ``enable_gqa=True``: the repeat is peeled off, the op takes the K/V heads as they are.

A mask is accepted when it depends on shapes only and, evaluated at every probe size, is exactly
a causal band: query i keeps keys ``i - L <= j <= i`` for one ``L`` at all sizes (``L >= n - 1``
at size n is plain causal there). A band with ``L`` smaller than some probe size becomes
``causal=True, window=(L, 0)`` (Hugging Face's ``sliding_window=W`` is ``L = W - 1``); its
s x s subgraph is then dead and removed. Any other mask is rejected with an error naming the
node.

What probing proves, and what it assumes: the mask subgraph depends on shapes only, so the only
size-specific facts it can hold are its integer constants (``sub(q_idx, 16)``) and the sequence
length itself. Probes run at fixed sizes (``PROBE_SEQS``, the largest past any small window) and
just past every integer constant ``c`` of the subgraph (``c + 1``, ``c + 2``, ``2c + 1``), so a
window, a hole or an offset written with a constant shows up at some probe, and a pattern that
moves with the sequence length (``j > i - s // 4``) gives a different ``L`` at different sizes
and is rejected. The assumption is that the pattern changes only at such constants (a
threshold computed from several constants, ``12 * 12``, is not probed past). A value constant
too large to probe past (``> MAX_PROBE_SEQ``: the n x n mask at that size is the cost) is
rejected with its value, not assumed away; shape-only constants (a buffer's size, a slice
bound) beyond it are skipped, as the model cannot run past them.

Document masks: a mask computed from the batch's metadata inputs (``position_ids``,
``attention_mask``, per-token document ids; never from the token ids or labels) is first
probed with one unpadded document per row (giving the band ``L`` as above), then evaluated on
random packed and right-padded probe batches: every real query row must keep exactly the keys
of its own document within the band (Hugging Face's packed path: documents where
``position_ids`` do not continue by +1; padding: a trailing document no real token sees). It
then becomes ``helix::attention(q, k, v, doc_ids)`` with ``doc_ids =
helix::document_ids(position_ids, segment_ids, attention_mask)``, one node per rule, which
the segments recompute from the inputs; the s x s mask subgraph is dead. What the probes
assume of the run-time inputs (right padding, one run per document id) the runtime checks.

Rejected with a named error: attention logit soft-capping (``tanh(scores / c) * c``, Gemma2's
``attn_logit_softcapping``) and ALiBi (a per-head bias linear in the key position, Bloom,
Falcon ``alibi=True``), and any other additive bias that is not a 0 / -inf mask.
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
from .data_independence import (
    METADATA_ONLY,
    TOKEN_INPUTS,
    find_batch_derived,
    find_data_independent,
)

aten = torch.ops.aten
HELIX_ATTENTION = torch.ops.helix.attention.default
DOCUMENT_IDS = torch.ops.helix.document_ids.default

SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL = {aten.matmul.default, aten.bmm.default}
PASSTHROUGH = {aten.to.dtype, aten.type_as.default, aten.contiguous.default, aten.clone.default,
               aten.alias.default, aten._to_copy.default, aten.to.dtype_layout}
PROBE_SEQS = (5, 9, 67)
MAX_PROBE_SEQ = 4200  # largest size a mask is evaluated at (an n x n bool tensor): covers W=4096
_SENTINEL = 2**31  # larger integer constants are "to the end" sentinels (slice ends), not sizes
_MASKED = -1e4  # an additive mask entry at or below this is "masked out"
# ops whose integer arguments are shapes, dims or slice bounds, not values of the mask
SHAPE_ARG_OPS = {aten.slice.Tensor, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                 aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim, aten.select.int,
                 aten.transpose.int, aten.permute.default, aten.ones.default, aten.zeros.default,
                 aten.empty.memory_format, aten.new_ones.default, aten.new_zeros.default,
                 aten.sym_size.int, aten.cumsum.default,
                 aten.diff.default}


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
        self.derived = find_batch_derived(gm, independent)  # masks built from position_ids & co.
        self.maskish = independent | self.derived  # what a mask may be computed from
        self._cache: dict[tuple[fx.Node, str], tuple[int | None, str, dict | None]] = {}
        ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
        b, s = (d.node.expr for d in ph[0].meta["val"].shape)
        self.b_sym, self.s_sym = b, s

    def evaluate(self, mask: fx.Node, seq: int, values: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The mask at batch 1 (or the batch of ``values``) and sequence ``seq``; placeholders
        named in ``values`` take those tensors, the others zeros."""
        values = values or {}
        batch = next(iter(values.values())).shape[0] if values else 1
        env = {self.b_sym: batch, self.s_sym: seq}
        g = fx.Graph()
        remap: dict[fx.Node, fx.Node] = {}
        inputs: list[torch.Tensor] = []
        for n in self._ancestors(mask):
            if n.op == "placeholder":
                val = n.meta["val"]
                shape = [int(d.node.expr.xreplace(env)) if isinstance(d, torch.SymInt) else int(d) for d in val.shape]
                inputs.append(values[n.name].to(val.dtype) if n.name in values else torch.zeros(shape, dtype=val.dtype))
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

    def _constants(self, mask: fx.Node) -> dict[int, bool]:
        """Integer constants in the arguments of the mask's subgraph (absolute values), mapped
        to whether one of them is used as a value (index arithmetic, comparisons) rather than
        only as a shape, dim or slice bound."""
        found: dict[int, bool] = {}

        def visit(a, value: bool):
            if isinstance(a, bool):
                return
            if isinstance(a, int):
                found[abs(a)] = found.get(abs(a), False) or value
            elif isinstance(a, (list, tuple)):
                for x in a:
                    visit(x, value)
            elif isinstance(a, dict):
                for x in a.values():
                    visit(x, value)

        for n in self._ancestors(mask):
            if n.op == "call_function":
                value = n.target not in SHAPE_ARG_OPS
                visit(n.args, value)
                visit(n.kwargs, value)
        return found

    def probe_sizes(self, mask: fx.Node, node: fx.Node) -> list[int]:
        sizes = set(PROBE_SEQS)
        for c, as_value in self._constants(mask).items():
            if c >= _SENTINEL or c < 2:
                continue
            if c + 2 > MAX_PROBE_SEQ:
                if not as_value:
                    # a buffer's size or a slice bound: the model cannot run past it anyway
                    continue
                raise UnsupportedModelError(
                    f"attention at {node.format_node()}: its mask {mask.format_node()} holds the "
                    f"constant {c}, larger than the mask probe limit MAX_PROBE_SEQ={MAX_PROBE_SEQ} "
                    f"(e.g. a sliding window of {c} tokens): helix_compiler cannot prove the mask "
                    f"is causal or a causal sliding window at every sequence length. Use a window "
                    f"<= {MAX_PROBE_SEQ - 2} or no window (sliding_window=None)")
            sizes |= {c + 1, c + 2}
            if 2 * c + 1 <= MAX_PROBE_SEQ:
                sizes.add(2 * c + 1)
        return sorted(sizes)

    def band(self, mask: fx.Node, kind: str, node: fx.Node) -> tuple[int | None, str, dict | None]:
        """``(left, why, documents)``: the left window of a causal band mask (``None`` for plain
        causal at every probe, ``L`` for the band ``i - L <= j <= i``), ``why`` non-empty when
        it is neither, and for a mask built from the batch's metadata inputs the document rule
        (``{"position_ids": name, "segment_ids": name, "attention_mask": name}``, None each
        when unused) under which it is that band within each document.

        kind: 'keep' (True = attend), 'drop' (True = masked out), 'additive' (0 / very negative,
        or a bool keep-mask as SDPA reads one)."""
        key = (mask, kind)
        if key not in self._cache:
            self._cache[key] = self._band(mask, kind, node)
        return self._cache[key]

    def _keep(self, m: torch.Tensor, kind: str, seq: int, node: fx.Node, mask: fx.Node) -> torch.Tensor | str:
        """The bool keep-mask ``[batch * heads, seq, seq]`` of an evaluated mask, or why not."""
        if m.dim() < 2 or tuple(m.shape[-2:]) != (seq, seq):
            return f"the mask has shape {tuple(m.shape)} at seq {seq}, not [.., {seq}, {seq}]"
        if kind in ("keep", "drop") and m.dtype != torch.bool:
            return f"a {m.dtype} mask where a bool mask is used"
        if m.dtype == torch.bool:
            keep = m if kind != "drop" else ~m
        else:
            finite_bias = (m > _MASKED) & (m != 0)
            if bool(finite_bias.any()):
                _reject_bias(node, mask, m, seq)
            keep = m == 0
        return keep

    def _band(self, mask: fx.Node, kind: str, node: fx.Node) -> tuple[int | None, str, dict | None]:
        if mask not in self.maskish:
            return -2, "the mask depends on input data or is not causal", None  # wording kept: tests/users match it
        documents = None
        if mask in self.derived:
            documents, why = self._document_rule(mask)
            if why:
                return -2, why, None
        left: int | None = None  # smallest size at which the band is visible gives L
        for seq in self.probe_sizes(mask, node):
            keep = self._keep(self.evaluate(mask, seq, _one_document(documents, seq)), kind, seq, node, mask)
            if isinstance(keep, str):
                return -2, keep, None
            keep = keep.reshape(-1, seq, seq)
            if not bool((keep == keep[:1]).all()):
                return -2, f"the mask differs between batch entries or heads at seq {seq}", None
            keep = keep[0]
            seen = int(keep[-1].sum()) - 1  # the last row keeps min(seq - 1, L) + 1 keys
            if seen < 0:
                return -2, f"at seq {seq} the last query row sees no key", None
            band = _band_mask(seq, seq - 1 if seen >= seq - 1 else seen)
            if not bool((keep == band).all()):
                bad = (keep != band).nonzero()[0].tolist()
                return -2, (f"at seq {seq} it is not a causal band (query {bad[0]}, key {bad[1]} "
                            f"is {'kept' if keep[bad[0], bad[1]] else 'masked'})"), None
            if seen < seq - 1:  # band visible at this size
                if left is not None and left != seen:
                    return -2, f"its window changes with the sequence length ({left} vs {seen} at seq {seq})", None
                left = seen
            elif left is not None:
                return -2, f"its window changes with the sequence length ({left}, then causal at seq {seq})", None
        if documents is not None:
            why = self._check_documents(mask, kind, node, documents, left)
            if why:
                return -2, why, None
        return left, "", documents

    def _document_rule(self, mask: fx.Node) -> tuple[dict | None, str]:
        """Which metadata inputs a batch-dependent mask reads, by their (Hugging Face) names:
        ``position_ids`` (packed documents restart their positions), ``attention_mask``
        (padding), any other one per-token document ids."""
        names = _value_inputs(mask)
        tokens = [n for n in names if n in TOKEN_INPUTS]
        if tokens:
            return None, f"the mask depends on {tokens[0]}: masks may depend on metadata inputs only"
        rule = {"position_ids": None, "segment_ids": None, "attention_mask": None}
        for name in names:
            role = name if name in ("position_ids", "attention_mask") else "segment_ids"
            if rule[role] is not None:
                return None, f"the mask reads two per-token document-id inputs ({rule[role]}, {name})"
            rule[role] = name
        return rule, ""

    def _check_documents(self, mask: fx.Node, kind: str, node: fx.Node, documents: dict,
                         left: int | None) -> str:
        """Evaluate the mask on random packed / padded probe batches: every real query row must
        keep exactly the keys of its own document within the causal band (padding rows, whose
        labels must be ignored, are not compared)."""
        gen = torch.Generator().manual_seed(0)
        # the band's probe sizes too: a rule written with a constant shows past that constant
        for seq in sorted({5, 9, 33, 67} | set(self.probe_sizes(mask, node))):
            for trial in range(3):
                values, doc, valid = _probe_batch(documents, seq, gen, trial)
                keep = self._keep(self.evaluate(mask, seq, values), kind, seq, node, mask)
                if isinstance(keep, str):
                    return keep
                batch = doc.shape[0]
                keep = keep.reshape(batch, -1, seq, seq)
                band = _band_mask(seq, seq - 1 if left is None else left)
                want = band[None] & (doc[:, :, None] == doc[:, None, :]) & valid[:, None, :]
                rows = valid[:, None, :, None].expand_as(keep)
                bad = (keep != want[:, None]) & rows
                if bool(bad.any()):
                    b, _, i, j = bad.nonzero()[0].tolist()
                    inputs = {k: v[b].tolist() for k, v in values.items()}
                    return (f"it is not a causal mask within documents: with {inputs} query {i} "
                            f"{'keeps' if keep[b, 0, i, j] else 'masks'} key {j}")
        return ""

def _value_inputs(node: fx.Node) -> list[str]:
    """Names of the placeholders whose values (not only sizes) ``node`` is computed from."""
    seen: set[fx.Node] = set()
    stack, names = [node], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            names.append(n.name)
        elif not (n.op == "call_function" and n.target in METADATA_ONLY):
            stack.extend(n.all_input_nodes)
    return sorted(names)


def _one_document(documents: dict | None, seq: int) -> dict[str, torch.Tensor]:
    """Metadata inputs of one unpadded document of ``seq`` tokens (batch 1)."""
    if documents is None:
        return {}
    values = {}
    if documents["position_ids"]:
        values[documents["position_ids"]] = torch.arange(seq)[None]
    if documents["segment_ids"]:
        values[documents["segment_ids"]] = torch.zeros(1, seq, dtype=torch.long)
    if documents["attention_mask"]:
        values[documents["attention_mask"]] = torch.ones(1, seq, dtype=torch.long)
    return values


def _probe_batch(documents: dict, seq: int, gen: torch.Generator, trial: int):
    """Two rows of random packed documents (and right padding when the mask reads an
    attention_mask): ``(inputs by name, document index per token, real-token flags)``."""
    rows_pos, rows_seg, rows_am, rows_doc, rows_valid = [], [], [], [], []
    for _ in range(2):
        pad = int(torch.randint(0, max(1, seq // 3), (), generator=gen)) if documents["attention_mask"] else 0
        real = seq - pad
        packed = documents["position_ids"] or documents["segment_ids"]
        n_cuts = min(real - 1, 1 + trial) if packed else 0
        cuts = sorted(torch.randperm(real - 1, generator=gen)[:n_cuts].add(1).tolist()) if n_cuts > 0 else []
        bounds = [0, *cuts, real]
        doc = torch.zeros(seq, dtype=torch.long)
        pos = torch.zeros(seq, dtype=torch.long)
        seg = torch.zeros(seq, dtype=torch.long)
        for d, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            doc[a:b] = d
            pos[a:b] = torch.arange(b - a) + (3 * trial if d == 0 else 0)  # a first document may continue
            seg[a:b] = 5 * d + trial
        doc[real:] = len(bounds) - 1  # padding: no real token may see it
        pos[real:] = torch.arange(pad) + real
        seg[real:] = seg[real - 1] if real else 0
        rows_pos.append(pos)
        rows_seg.append(seg)
        rows_am.append((torch.arange(seq) < real).long())
        rows_doc.append(doc)
        rows_valid.append(torch.arange(seq) < real)
    values = {}
    if documents["position_ids"]:
        values[documents["position_ids"]] = torch.stack(rows_pos)
    if documents["segment_ids"]:
        values[documents["segment_ids"]] = torch.stack(rows_seg)
    if documents["attention_mask"]:
        values[documents["attention_mask"]] = torch.stack(rows_am)
    return values, torch.stack(rows_doc), torch.stack(rows_valid)


def _band_mask(seq: int, left: int) -> torch.Tensor:
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    return (j <= i) & (j >= i - left)


def _is_alibi(bias: torch.Tensor) -> bool:
    """A bias whose finite part grows linearly along the key axis with a per-row slope that is
    not zero everywhere (ALiBi: ``slope_h * (j [- i])``)."""
    if bias.dim() < 1 or bias.shape[-1] < 3 or not bias.is_floating_point():
        return False
    b = bias.double()
    finite = b > _MASKED
    d = b[..., 1:] - b[..., :-1]
    both = finite[..., 1:] & finite[..., :-1]
    if not bool(both.any()):
        return False
    ref = torch.where(both, d, torch.nan).nanmean(-1, keepdim=True)  # per-row slope
    same = torch.where(both, (d - ref).abs() <= 1e-6 * (1 + ref.abs()), True)
    return bool(same.all()) and bool((ref.nan_to_num(0).abs() > 0).any())


def _reject_bias(node: fx.Node, bias: fx.Node, value: torch.Tensor, seq: int):
    if _is_alibi(value):
        raise UnsupportedModelError(
            f"attention at {node.format_node()} adds an ALiBi position bias ({bias.format_node()}: "
            f"per-head slopes times key positions, as in Bloom or Falcon with alibi=True). "
            f"helix_compiler does not support ALiBi; use a model with rotary or learned "
            f"positions (e.g. Falcon with alibi=False)")
    raise UnsupportedModelError(
        f"attention at {node.format_node()} adds a bias {bias.format_node()} whose values at seq "
        f"{seq} are not 0 / -inf (e.g. {value[(value > _MASKED) & (value != 0)][:3].tolist()}): "
        f"only causal masks and causal sliding windows are supported; remove the attention bias")


def _reject_mask(node: fx.Node, why: str):
    raise UnsupportedModelError(
        f"attention at {node.format_node()} uses a mask helix_compiler cannot pipeline ({why}). "
        f"Only causal masks, causal sliding windows (query i sees keys i-L..i) or none are "
        f"supported: drop attention_mask/padding from the inputs or pack sequences without "
        f"padding")


def _match_sdpa(node: fx.Node, probe: _MaskProbe):
    a = _args(node)
    if float(a.get("dropout_p", 0.0) or 0.0) != 0.0:
        raise UnsupportedModelError(f"attention dropout p={a['dropout_p']} at {node.format_node()}: set the "
                                    f"attention dropout probability to 0")
    causal = bool(a.get("is_causal", False))
    mask = a.get("attn_mask")
    left = documents = None
    if mask is not None:
        if causal:
            _reject_mask(node, "both attn_mask and is_causal are set")
        left, why, documents = probe.band(mask, "additive", node)
        if why:
            _reject_mask(node, why)
        causal = True
    q, k, v = a["query"], a["key"], a["value"]
    return q, _peel_repeat_kv(k), _peel_repeat_kv(v), causal, a.get("scale"), left, documents, [node]


def _scalar(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _reject_softcap_and_alibi(x: fx.Node, softmax: fx.Node, probe: _MaskProbe) -> None:
    """Scores that are not a plain (scaled) ``q @ k^T``: soft-capping and ALiBi biases."""
    if x.op == "call_function" and x.target == aten.tanh.default:
        raise UnsupportedModelError(
            f"attention logit soft-capping (scores = tanh(scores / cap) * cap, Gemma2's "
            f"attn_logit_softcapping) at {x.format_node()} feeding {softmax.format_node()}: "
            f"helix::attention has no softcap; set config.attn_logit_softcapping=None")
    y = x
    while y.op == "call_function" and y.target in VIEW_OPS | PASSTHROUGH:
        y = y.args[0]
    if y.op == "call_function" and y.target == aten.baddbmm.default:
        beta = y.kwargs.get("beta", y.args[3] if len(y.args) > 3 else 1)
        bias = y.args[0]
        if beta != 0 and bias in probe.independent:
            value = probe.evaluate(bias, PROBE_SEQS[1])
            if _is_alibi(value):
                _reject_bias(softmax, bias, value, PROBE_SEQS[1])
        raise UnsupportedModelError(
            f"attention scores at {y.format_node()} add a bias {bias.format_node()} to q @ k^T "
            f"(baddbmm): only causal masks and causal sliding windows are supported; remove "
            f"the attention bias")


# views whose output layout follows their input's (a reshape or contiguous may copy)
_LAYOUT_VIEWS = {aten.transpose.int, aten.permute.default, aten.reshape.default, aten.view.default,
                 aten._unsafe_view.default, aten.contiguous.default, aten.unsqueeze.default, aten.squeeze.dim}


def _refresh_layouts(out: fx.Node) -> None:
    """The views of the replaced call's output were traced with that call's output layout
    (e.g. the CPU flash kernel's (b, s, h, d) strides); helix::attention returns contiguous
    (b, h, s, d). Recompute their fake values, so that the cost model sees which reshape
    copies."""
    stack = [out]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op != "call_function" or u.target not in _LAYOUT_VIEWS:
                continue
            try:
                vals = fx.node.map_arg((u.args, u.kwargs), lambda a: a.meta["val"])
                u.meta["val"] = u.target(*vals[0], **vals[1])
            except Exception:  # noqa: BLE001 - keep the traced value; only byte counts depend on it
                continue
            stack.append(u)


def _diagnose_unmatched(softmax: fx.Node, probe: _MaskProbe) -> None:
    """A softmax that did not match attention (Bloom's ``bmm`` on 3-d views, say): raise if its
    scores carry an ALiBi bias, so the error names the feature instead of "no attention"."""
    x = _peel(softmax.args[0])
    for _ in range(16):
        if x.op != "call_function":
            return
        if x.target == aten.baddbmm.default:
            candidates, nxt = [x.args[0]], None
        elif x.target == aten.add.Tensor:
            nodes = [a for a in x.args if isinstance(a, fx.Node)]
            candidates = [a for a in nodes if a in probe.independent]
            rest = [a for a in nodes if a not in probe.independent]
            nxt = rest[0] if len(rest) == 1 else None
        elif x.target in VIEW_OPS | PASSTHROUGH | {aten.masked_fill.Scalar, aten.mul.Tensor, aten.div.Tensor}:
            candidates, nxt = [], x.args[0]
        elif x.target == aten.where.self:
            candidates, nxt = [], x.args[1]
        else:
            return
        for bias in candidates:
            if isinstance(bias, fx.Node) and bias in probe.independent:
                value = probe.evaluate(bias, PROBE_SEQS[1])
                if value.is_floating_point() and _is_alibi(value):
                    _reject_bias(softmax, bias, value, PROBE_SEQS[1])
        if not isinstance(nxt, fx.Node):
            return
        x = _peel(nxt)


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
    left = documents = None
    scale = 1.0
    mask = kind = None
    if x.target == aten.masked_fill.Scalar:
        fill = _scalar(x.args[2])
        if fill is None or fill > _MASKED:
            _reject_mask(x, f"masked_fill with the value {x.args[2]!r}, not -inf")
        mask, kind, where, x = x.args[1], "drop", x, _peel(x.args[0])
    elif x.target in (aten.where.self, aten.where.ScalarOther):
        fill = _scalar(x.args[2]) if x.target == aten.where.ScalarOther else None
        if fill is None or fill > _MASKED:
            _reject_mask(x, "where() whose other value is not -inf")
        mask, kind, where, x = x.args[0], "keep", x, _peel(x.args[1])
    elif x.target == aten.add.Tensor:
        a0, a1 = x.args
        where = x
        mask, x = (a1, a0) if a1 in probe.maskish else (a0, a1)
        kind, x = "additive", _peel(x)
    if mask is not None:
        left, why, documents = probe.band(mask, kind, where)
        if why:
            _reject_mask(where, why)
        causal = True
    while x.target in (aten.mul.Tensor, aten.div.Tensor) and _scalar(x.args[1]) is not None:
        c = _scalar(x.args[1])
        scale = scale * c if x.target == aten.mul.Tensor else scale / c
        x = _peel(x.args[0])
    _reject_softcap_and_alibi(x, softmax, probe)
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
    return q, _peel_repeat_kv(k), _peel_repeat_kv(v), causal, scale, left, documents, [pv]


def _document_ids(graph: fx.Graph, documents: dict, cache: dict[tuple, fx.Node]) -> fx.Node:
    """The ``helix::document_ids(position_ids, segment_ids, attention_mask)`` node of this rule,
    right after the placeholders (made once per rule)."""
    key = tuple(documents[k] for k in ("position_ids", "segment_ids", "attention_mask"))
    if key not in cache:
        phs = {n.name: n for n in graph.nodes if n.op == "placeholder"}
        with graph.inserting_after(list(phs.values())[-1]):
            node = graph.call_function(DOCUMENT_IDS, tuple(phs[k] if k else None for k in key))
        src = phs[next(k for k in key if k)].meta["val"]
        node.meta["val"] = src.new_empty(src.shape, dtype=torch.int32)
        cache[key] = node
    return cache[key]


def canonicalize_attention(gm: fx.GraphModule) -> PassResult:
    """Replace every attention with ``helix::attention``; returns info["count"]."""
    independent = find_data_independent(gm)
    probe = _MaskProbe(gm, independent)
    graph = gm.graph
    count = 0
    doc_nodes: dict[tuple, fx.Node] = {}  # one helix::document_ids per distinct rule
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten.scaled_dot_product_attention.default:
            match = _match_sdpa(node, probe)
        elif node.target in SOFTMAX:
            match = _match_explicit(node, probe)
            if match is None:
                _diagnose_unmatched(node, probe)
                continue
        else:
            continue
        q, k, v, causal, scale, left, documents, (result,) = match
        if scale is None:
            scale = 1.0 / math.sqrt(_shape(q)[-1])
        kwargs = {"causal": causal, "scale": float(scale)}
        window = None if left is None else (int(left), 0)
        if window is not None:  # only windowed calls carry it: the op's default is no window
            kwargs["window"] = list(window)
        args = (q, k, v)
        if documents is not None:
            args = (q, k, v, _document_ids(graph, documents, doc_nodes))
        with graph.inserting_before(result):
            op = graph.call_function(HELIX_ATTENTION, args, kwargs)
            out = graph.call_function(operator.getitem, (op, 0))
        op.meta.update(nn_module_stack=result.meta.get("nn_module_stack", {}), stack_trace=result.meta.get("stack_trace"))
        op.meta[meta.ATTENTION_CAUSAL] = causal
        op.meta[meta.ATTENTION_WINDOW] = window
        op.meta[meta.ATTENTION_DOCUMENTS] = documents
        qv, vv = q.meta["val"], v.meta["val"]
        lse_dtype = torch.float32 if qv.dtype in (torch.float16, torch.bfloat16) else qv.dtype
        op.meta["val"] = (qv.new_empty((*qv.shape[:3], vv.shape[-1])), qv.new_empty(qv.shape[:3], dtype=lse_dtype))
        out.meta["val"] = op.meta["val"][0]
        out.meta["nn_module_stack"] = op.meta["nn_module_stack"]
        result.replace_all_uses_with(out)
        graph.erase_node(result)
        _refresh_layouts(out)
        count += 1
    # Attention-probability dropout (p=0) is "impure" to fx's DCE; once its matmul is gone it
    # is dead all the same.
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output") or (
        n.op == "call_function" and n.target != aten.dropout.default and n.is_impure()))
    graph.lint()
    gm.recompile()
    return PassResult(gm, count > 0, {"count": count})
