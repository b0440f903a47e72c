"""From the sympy cost model to the numbers the simulator uses (seconds, bytes per segment),
and synthetic chains for tests.

Durations of one segment for one micro batch on a device (``dtype`` picks the peak):

* matmul part = FLOPs - attention FLOPs, at ``peak * matmul_fraction``;
* attention part = attention FLOPs * :func:`attention_fraction` (the fraction of the dense
  scores the kernel computes: ``extra["attention_computed_fraction"]`` at the run's sizes for
  windowed attention and packed documents, else ``attention_causal_factor``, a causal
  kernel skipping the masked half), at ``peak * attention_fraction``;
* optional memory-bound part: ``extra["mem_bytes_fwd"]`` / ``extra["mem_bytes_bwd"]`` bytes at
  the HBM bandwidth, when the cost model provides them;
* tensor parallelism (``extra["tp_size"]`` > 1): the tp group's all-reduces
  (``extra["tp_all_reduce_bytes_fwd"]`` / ``_bwd``) as ring all-reduces over the device's
  intra-node links, ``2 (tp - 1) / tp`` of the bytes each way, its all-gathers and
  reduce-scatters (``extra["tp_gather_bytes_*"]``, sequence parallelism) ``(tp - 1) / tp``,
  not overlapped with compute (they sit between the matmuls that need them); a
  recomputation reruns the forward's.

``F`` uses the forward FLOPs, ``B`` the backward, ``I`` / ``W`` the input- / weight-gradient
shares (attention backward counts as input gradient), ``R`` the recompute FLOPs of the
schedule's policy (attention FLOPs in them, at the attention rate, only where the policy table
``ir.recompute`` says the recompute reruns attention: ``full`` and ``selective``).
Memory, what the runtime holds (the graph cost model's ``SegmentCost.held_bytes``,
``rerun_bytes``, ``out_new_bytes``, counted by storage): a forward's stash from the end of
``F`` to the end of its ``B``; what ``R`` adds (the saved tensors and outputs it rebuilds) to
the end of ``B``; the new memory of a forward's outputs on its own rank. Costs without them
(the analytic chains) use ``saved_bytes[policy]``, ``saved_bytes["none"] - saved_bytes[policy]
+ out_bytes`` and ``out_bytes - shipped_param_bytes``. Messages carry ``out_bytes`` (the
gradient of a boundary has its size).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import sympy

from ..cost.devices import DeviceSpec
from ..errors import HelixError
from ..ir.recompute import STASH_ALL, STASH_INPUTS, STASH_INPUTS_ATTENTION, check_policy, policy_for
from ..ir.segment import POLICIES, B, S, SegmentCost, SegmentSpec, chain_specs


@dataclass(frozen=True)
class OpTimes:
    """Per chain segment (index = chain position): seconds per instruction kind and bytes."""

    fwd: tuple[float, ...]
    bwd: tuple[float, ...]
    bwd_input: tuple[float, ...]
    bwd_weight: tuple[float, ...]
    recompute: tuple[float, ...]
    saved_bytes: tuple[float, ...]  # the stash of a forward, from its end to the end of its B
    recompute_bytes: tuple[float, ...]  # what R adds (rebuilt saved tensors and outputs), to the end of B
    out_bytes: tuple[float, ...]  # a message (the output, or the gradient of it)
    # the outputs' new memory on the producing rank (default out_bytes): outputs that are its
    # inputs passed through, its stash or parameters (shipped weights) allocate nothing ...
    local_out_bytes: tuple[float, ...] = ()
    # ... and so the part of saved_bytes[c] that a forward handed its input on its own rank
    # does not allocate again (default 0)
    local_alias: tuple[float, ...] = ()
    # the stash of a forward run under autograd where the policy would stash less (a forward
    # whose backward follows at once gets no R; default saved_bytes + recompute_bytes)
    graph_bytes: tuple[float, ...] = ()

    def duration(self, op: str, c: int) -> float:
        return {"F": self.fwd, "B": self.bwd, "I": self.bwd_input, "W": self.bwd_weight,
                "R": self.recompute}[op][c]

    @staticmethod
    def uniform(n: int, *, fwd: float = 1.0, bwd: float = 1.0, **kw) -> OpTimes:
        """Same numbers for every segment (``kw`` may override any field with a tuple)."""
        base = dict(fwd=(fwd,) * n, bwd=(bwd,) * n, bwd_input=(bwd / 2,) * n,
                    bwd_weight=(bwd / 2,) * n, recompute=(0.0,) * n, saved_bytes=(0.0,) * n,
                    recompute_bytes=(0.0,) * n, out_bytes=(0.0,) * n)
        base.update(kw)
        return OpTimes(**base)


@functools.lru_cache(maxsize=1024)
def _fraction_at(expr: sympy.Expr, b: int, s: int) -> float:
    return float(expr.subs({B: b, S: s}))


def attention_fraction(cost: SegmentCost, *, micro_batch_size: int, seq_len: int) -> float:
    """The fraction of ``cost``'s dense attention FLOPs (``attention_flops_fwd`` / ``_bwd``)
    its kernels compute at these sizes: ``extra["attention_computed_fraction"]`` evaluated at
    ``B = micro_batch_size``, ``S = seq_len`` when the cost model gives it (a sliding window,
    packed documents), else ``attention_causal_factor``. The one rule every reader of the
    attention part (simulator durations, placement loads) goes through."""
    frac = cost.extra.get("attention_computed_fraction")
    if frac is None:
        return float(cost.attention_causal_factor)
    frac = sympy.sympify(frac)
    if frac.is_Number:
        return float(frac)
    if not frac.free_symbols <= {B, S}:
        raise HelixError(f"extra['attention_computed_fraction'] = {frac} has symbols other than B and S")
    return _fraction_at(frac, int(micro_batch_size), int(seq_len))


def op_times(costs: Sequence[SegmentCost], device: DeviceSpec, *, micro_batch_size: int,
             seq_len: int, dtype: str = "bf16", recompute: str = "none",
             specs: Sequence[SegmentSpec] | None = None) -> OpTimes:
    """Durations and bytes of every segment of the chain (``specs``: its segment specs; by
    default the chain of ``(len(costs) - 2) / 2`` layers)."""
    check_policy(recompute)
    if specs is None:
        specs = chain_specs((len(costs) - 2) // 2)
    if len(specs) != len(costs):
        raise HelixError(f"op_times: {len(costs)} SegmentCosts for {len(specs)} segment specs")
    mm = device.matmul_rate(dtype)
    at = device.attention_rate(dtype)
    bw = device.memory_bandwidth
    fields: dict[str, list[float]] = {k: [] for k in OpTimes.__dataclass_fields__}
    env = {B: micro_batch_size, S: seq_len}
    memo: dict = {}

    def num(e) -> float:
        e = sympy.sympify(e)
        if e.is_Number:
            return float(e)
        if e not in memo:
            memo[e] = float(e.subs(env))
        return memo[e]

    for k, c in enumerate(costs):
        cf = attention_fraction(c, micro_batch_size=micro_batch_size, seq_len=seq_len)
        a_f, a_b = num(c.attention_flops_fwd), num(c.attention_flops_bwd)
        f, b = num(c.flops_fwd), num(c.flops_bwd)
        bi, bwt = num(c.flops_bwd_input), num(c.flops_bwd_weight)
        mem_f = num(c.extra.get("mem_bytes_fwd", 0)) / bw
        mem_b = num(c.extra.get("mem_bytes_bwd", 0)) / bw
        tp_f, tp_b = _tp_all_reduce_seconds(c, device, num)
        fields["fwd"].append((f - a_f) / mm + a_f * cf / at + mem_f + tp_f)
        fields["bwd"].append((b - a_b) / mm + a_b * cf / at + mem_b + tp_b)
        fields["bwd_input"].append(max(bi - a_b, 0.0) / mm + a_b * cf / at + mem_b / 2 + tp_b)
        fields["bwd_weight"].append(bwt / mm + mem_b / 2)
        if recompute not in c.recompute_flops and recompute != "none":
            raise HelixError(f"segment {k}: its SegmentCost has no recompute_flops for policy "
                             f"{recompute!r} (it has {sorted(c.recompute_flops)})")
        rf = num(c.recompute_flops.get(recompute, 0))
        ra = min(rf, a_f) if policy_for(recompute, specs[k].kind).reruns_attention else 0.0
        fields["recompute"].append((rf - ra) / mm + ra * cf / at + (tp_f if rf > 0 else 0.0))
        if recompute not in c.saved_bytes:
            raise HelixError(f"segment {k}: its SegmentCost has no saved_bytes for policy "
                             f"{recompute!r} (it has {sorted(c.saved_bytes)})")
        out = num(c.out_bytes)
        fields["out_bytes"].append(out)
        if c.held_bytes:  # the runtime's memory, counted by storage (cost.model)
            fields["saved_bytes"].append(num(c.held_bytes[recompute]))
            fields["graph_bytes"].append(num(c.held_bytes["none"]))
            fields["recompute_bytes"].append(num(c.rerun_bytes[recompute]))
            fields["local_out_bytes"].append(num(c.out_new_bytes[recompute]))
            # a local input that is not new memory on the producer is the producer's stash or weights
            fields["local_alias"].append(fields["out_bytes"][k - 1] - fields["local_out_bytes"][k - 1] if k else 0.0)
            continue
        saved = num(c.saved_bytes[recompute])
        full = num(c.saved_bytes.get("none", c.saved_bytes[recompute]))
        shipped = num(c.shipped_param_bytes)
        fields["saved_bytes"].append(saved)
        fields["graph_bytes"].append(max(full, saved))
        fields["recompute_bytes"].append(max(full - saved, 0.0) + out if rf > 0 else 0.0)
        fields["local_out_bytes"].append(out - shipped)
        counts_inputs = policy_for(recompute, specs[k].kind).stash in (STASH_INPUTS, STASH_INPUTS_ATTENTION)
        shipped_in = fields["out_bytes"][k - 1] - fields["local_out_bytes"][k - 1] if k else 0.0
        fields["local_alias"].append(shipped_in if counts_inputs else 0.0)
    return OpTimes(**{k: tuple(v) for k, v in fields.items()})


def _tp_all_reduce_seconds(cost: SegmentCost, device: DeviceSpec, num) -> tuple[float, float]:
    tp = int(cost.extra.get("tp_size", 1))
    if tp <= 1:
        return 0.0, 0.0
    share = (tp - 1) / tp / device.intra_node_bandwidth
    lat = (tp - 1) * device.intra_node_latency  # ring steps of one all-gather / reduce-scatter

    def seconds(direction: str) -> float:
        reduce = num(cost.extra[f"tp_all_reduce_bytes_{direction}"])
        gather = num(cost.extra.get(f"tp_gather_bytes_{direction}", 0))
        return (2 * reduce + gather) * share + (2 * lat if reduce else 0.0) + (lat if gather else 0.0)

    return seconds("fwd"), seconds("bwd")


def unit_device(*, bandwidth: float = float("inf"), latency: float = 0.0) -> DeviceSpec:
    """A device where one FLOP takes one second (durations = FLOP counts), for tests."""
    return DeviceSpec(name="unit", peak_flops={"bf16": 1.0, "fp32": 1.0, "fp16": 1.0},
                      matmul_fraction=1.0, attention_fraction=1.0, memory_bandwidth=float("inf"),
                      memory_bytes=float("inf"), intra_node_bandwidth=bandwidth,
                      intra_node_latency=latency, inter_node_bandwidth=bandwidth,
                      inter_node_latency=latency, gpus_per_node=1)


def uniform_chain_costs(num_layers: int, *, attn_fwd: float = 4.0, attn_pre_fwd: float = 0.0,
                        param_fwd: float = 1.0, embed_fwd: float = 0.0,
                        final_fwd: float | None = None, head_fwd: float = 0.0,
                        bwd_factor: float = 2.0, weight_share: float = 0.5,
                        attn_saved: float = 1.0, param_saved: float = 1.0,
                        embed_saved: float = 0.0, head_saved: float = 0.0,
                        recompute_saved_fraction: float = 0.25, out_bytes: float = 0.0,
                        causal_factor: float = 1.0, scale_with_s: bool = False) -> list[SegmentCost]:
    """A synthetic chain with the same cost in every layer.

    FLOPs: attention segments ``attn_fwd`` (of which ``attn_pre_fwd`` is the pre-function, e.g.
    the QKV GEMM; the rest is attention proper), parameter chunks ``param_fwd``, ``PL``
    ``final_fwd`` (default ``param_fwd``), ``E`` ``embed_fwd``, ``H`` ``head_fwd``; backward =
    ``bwd_factor`` x forward; ``weight_share`` of a non-attention backward is the weight
    gradient. Saved bytes under "none" are ``*_saved``; checkpointing policies keep
    ``recompute_saved_fraction`` of them for recomputed segments. ``causal_factor`` 1 makes
    durations on :func:`unit_device` equal the FLOP numbers. ``scale_with_s``: attention
    grows like ``s^2``, the rest like ``s`` (values given are at ``s = 1``).
    """
    lin = S if scale_with_s else sympy.Integer(1)
    quad = S ** 2 if scale_with_s else sympy.Integer(1)
    final_fwd = param_fwd if final_fwd is None else final_fwd

    def R(x) -> sympy.Rational:  # 0.1 -> 1/10 exactly (fast; nsimplify is slow)
        return sympy.Rational(repr(float(x)))

    def rerun(kind: str, fwd, afwd) -> dict[str, sympy.Expr]:  # the policy table's rerun FLOPs
        return {pol: sympy.sympify(policy_for(pol, kind).rerun_flops(forward=fwd, attention=afwd))
                for pol in POLICIES}

    def keep(kind: str, saved_none) -> dict[str, sympy.Expr]:
        # a segment that keeps all it keeps under "none" keeps saved_none, a checkpointed one
        # (inputs, with or without the attention's out + lse) the fraction
        ck = R(recompute_saved_fraction) * saved_none
        return {pol: saved_none if policy_for(pol, kind).stash == STASH_ALL else ck for pol in POLICIES}

    by_kind: dict[str, SegmentCost] = {}
    out = []
    for spec in chain_specs(num_layers):
        if spec.kind in by_kind:
            out.append(by_kind[spec.kind])
            continue
        if spec.kind == "attn":
            core = attn_fwd - attn_pre_fwd
            fwd = R(attn_pre_fwd) * lin + R(core) * quad
            afwd = R(core) * quad
            bwd = R(bwd_factor) * fwd
            abwd = R(bwd_factor) * afwd
            pre_w = R(bwd_factor * weight_share * attn_pre_fwd) * lin
            saved_none = R(attn_saved) * lin
            out.append(SegmentCost(
                flops_fwd=fwd, flops_bwd=bwd, flops_bwd_input=bwd - pre_w, flops_bwd_weight=pre_w,
                attention_flops_fwd=afwd, attention_flops_bwd=abwd,
                recompute_flops=rerun(spec.kind, fwd, afwd),
                saved_bytes=keep(spec.kind, saved_none), param_bytes=sympy.Integer(0),
                out_bytes=R(out_bytes) * lin, attention_causal_factor=R(causal_factor)))
            by_kind[spec.kind] = out[-1]
            continue
        f, sv = {"embed": (embed_fwd, embed_saved), "param": (param_fwd, param_saved),
                 "final": (final_fwd, param_saved), "head": (head_fwd, head_saved)}[spec.kind]
        fwd = R(f) * lin
        bwd = R(bwd_factor) * fwd
        w = R(weight_share) * bwd
        saved_none = R(sv) * lin
        out.append(SegmentCost(
            flops_fwd=fwd, flops_bwd=bwd, flops_bwd_input=bwd - w, flops_bwd_weight=w,
            attention_flops_fwd=sympy.Integer(0), attention_flops_bwd=sympy.Integer(0),
            recompute_flops=rerun(spec.kind, fwd, sympy.Integer(0)),
            saved_bytes=keep(spec.kind, saved_none),
            param_bytes=sympy.Integer(0),
            out_bytes=sympy.Integer(0) if spec.kind == "head" else R(out_bytes) * lin,
            attention_causal_factor=R(causal_factor)))
        by_kind[spec.kind] = out[-1]
    return out
