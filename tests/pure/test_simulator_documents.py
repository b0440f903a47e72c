"""The computed fraction of attention (windowed kernels, packed documents) in the simulator and
the placement: ``extra["attention_computed_fraction"]`` at the run's sizes replaces
``attention_causal_factor`` wherever the attention part of a segment's time or load is
computed (``sim.costs.attention_fraction``, the one rule)."""

from __future__ import annotations

import dataclasses

import pytest
import sympy

from helix_compiler.errors import HelixError
from helix_compiler.ir.segment import B, S, chain_specs
from helix_compiler.lowering.build import build_schedule
from helix_compiler.lowering.placement import choose_head_stage, helix_placement, stage_loads
from helix_compiler.sim import simulate, uniform_chain_costs, unit_device
from helix_compiler.sim.costs import attention_fraction, op_times

WINDOW_LEFT = 3  # causal window (3, 0): each row sees min(i, 3) + 1 keys
BAND = sympy.Piecewise((S * (S + 1) / 2, S <= WINDOW_LEFT + 1),
                       ((WINDOW_LEFT + 1) * S - sympy.Rational(WINDOW_LEFT * (WINDOW_LEFT + 1), 2), True)) / S**2


def _with_fraction(costs, frac, kinds=("attn",)):
    """``costs`` (a chain) with ``extra["attention_computed_fraction"] = frac`` on the segments of ``kinds``."""
    specs = chain_specs((len(costs) - 2) // 2)
    return [dataclasses.replace(c, extra={**c.extra, "attention_computed_fraction": frac})
            if spec.kind in kinds else c for c, spec in zip(costs, specs, strict=True)]


def _costs(**kw):
    # per layer: A = 1 (QKV GEMM) + 3 attention FLOPs forward, bwd 2x; P = 2 forward
    return uniform_chain_costs(2, attn_fwd=4, attn_pre_fwd=1, param_fwd=2, causal_factor=0.5, **kw)


def test_attention_fraction_prefers_the_computed_fraction():
    plain = _costs()[1]
    assert attention_fraction(plain, micro_batch_size=1, seq_len=1) == 0.5
    docs = dataclasses.replace(plain, extra={"attention_computed_fraction": sympy.Rational(7, 32)})
    assert attention_fraction(docs, micro_batch_size=3, seq_len=16) == 7 / 32
    win = dataclasses.replace(plain, extra={"attention_computed_fraction": BAND})
    assert attention_fraction(win, micro_batch_size=1, seq_len=4) == 10 / 16  # shorter than the window: causal
    assert attention_fraction(win, micro_batch_size=1, seq_len=16) == (4 * 16 - 6) / 256
    assert attention_fraction(win, micro_batch_size=2, seq_len=64) == (4 * 64 - 6) / 4096
    odd = dataclasses.replace(plain, extra={"attention_computed_fraction": sympy.Symbol("x") / S})
    with pytest.raises(HelixError, match="other than B and S"):
        attention_fraction(odd, micro_batch_size=1, seq_len=4)
    # B may appear (it cancels in a FLOP-weighted mean, but is allowed)
    with_b = dataclasses.replace(plain, extra={"attention_computed_fraction": B / (4 * B)})
    assert attention_fraction(with_b, micro_batch_size=5, seq_len=4) == 0.25


@pytest.mark.parametrize("recompute", ["none", "full", "selective", "without_attention"])
def test_op_times_use_the_computed_fraction(recompute):
    """unit_device: durations are FLOP counts. A: fwd 1 + 3 attention, bwd 8 of which 6
    attention and 1 weight gradient (the QKV GEMM's); the fraction 1/4 replaces the causal 1/2."""
    costs = _with_fraction(_costs(), sympy.Rational(1, 4))
    t = op_times(costs, unit_device(), micro_batch_size=1, seq_len=1, recompute=recompute)
    t_causal = op_times(_costs(), unit_device(), micro_batch_size=1, seq_len=1, recompute=recompute)
    for c in (1, 3):
        assert t.fwd[c] == 1 + 3 * 0.25
        assert t.bwd[c] == 2 + 6 * 0.25
        assert t.bwd_input[c] == 1 + 6 * 0.25
        assert t.bwd_weight[c] == 1
        assert t_causal.fwd[c] == 1 + 3 * 0.5 and t_causal.bwd[c] == 2 + 6 * 0.5
    # recompute: full reruns the whole forward (attention at the fraction), selective only
    # the attention, without_attention the rest, none nothing
    expected = {"none": 0.0, "full": 1 + 3 * 0.25, "selective": 3 * 0.25, "without_attention": 1.0}[recompute]
    assert t.recompute[1] == t.recompute[3] == expected
    for c in (0, 2, 4, 5):  # no attention: unchanged
        assert (t.fwd[c], t.bwd[c], t.recompute[c]) == (t_causal.fwd[c], t_causal.bwd[c], t_causal.recompute[c])


def test_windowed_fraction_is_evaluated_at_the_seq_len():
    """A fraction in S (a window) is evaluated at the simulated seq_len; the FLOPs here grow
    like s^2 (attention) and s (the rest)."""
    costs = _with_fraction(_costs(scale_with_s=True), BAND)
    for s in (2, 4, 16, 100):
        t = op_times(costs, unit_device(), micro_batch_size=1, seq_len=s)
        frac = float(BAND.subs(S, s))
        assert t.fwd[1] == pytest.approx(s + 3 * s * s * frac, rel=1e-15)
        assert t.bwd[1] == pytest.approx(2 * s + 6 * s * s * frac, rel=1e-15)
    assert float(BAND.subs(S, 100)) == (4 * 100 - 6) / 100**2


def test_simulated_busy_time_drops_by_the_attention_part():
    """gpipe, p = 2, M = 4, recompute none: every rank's busy time is the sum of its segments'
    F + B over the micro batches, so the fraction 7/32 instead of 1/2 takes exactly
    M * (3 + 6) * (1/2 - 7/32) per attention segment off its rank."""
    specs = chain_specs(2)
    sched = build_schedule(specs, kind="gpipe", num_stages=2, num_microbatches=4, recompute="none")
    plain = simulate(sched, specs, _costs(), device=unit_device(), seq_len=1)
    docs = simulate(sched, specs, _with_fraction(_costs(), sympy.Rational(7, 32)), device=unit_device(), seq_len=1)
    saved = 4 * 9 * (0.5 - 7 / 32)
    # layer-wise: stage 0 holds E, A1, P1, stage 1 A2, P2, H; A = (1 + 3/2) + (2 + 3), P = 2 + 4
    assert plain.busy == [4 * (7.5 + 6)] * 2
    assert docs.busy[0] == pytest.approx(plain.busy[0] - saved, rel=1e-15)
    assert docs.busy[1] == pytest.approx(plain.busy[1] - saved, rel=1e-15)
    assert docs.iteration_time < plain.iteration_time


def test_stage_loads_count_attention_at_the_computed_fraction():
    M = 4
    pl = helix_placement(2, 2, M, 2)
    plain = stage_loads(pl, _costs(), micro_batch_size=1, seq_len=1)
    docs = stage_loads(pl, _with_fraction(_costs(), sympy.Rational(1, 4)), micro_batch_size=1, seq_len=1)
    # per micro batch: A = 4 + 8 - (1 - f) * (3 + 6), P = 2 + 4
    a_plain, a_docs = 12 - 0.5 * 9, 12 - 0.75 * 9
    assert sum(plain) == M * (2 * a_plain + 2 * 6)
    assert sum(docs) == M * (2 * a_docs + 2 * 6)
    attn_on = [0, 0]
    for c in (1, 3):
        for m in range(M):
            attn_on[pl.table[c][m]] += 1
    for r in range(2):
        assert plain[r] - docs[r] == attn_on[r] * (a_plain - a_docs)
    # a window's fraction at this seq_len (4: shorter than the window, plain causal band 10/16)
    win = stage_loads(pl, _with_fraction(_costs(), BAND), micro_batch_size=1, seq_len=4)
    assert sum(win) == M * (2 * (12 - (1 - 10 / 16) * 9) + 2 * 6)


def test_auto_head_stage_with_computed_fractions_is_valid():
    specs = chain_specs(4)
    costs = _with_fraction(uniform_chain_costs(4, attn_fwd=4, attn_pre_fwd=1, param_fwd=2, head_fwd=3,
                                               causal_factor=0.5), sympy.Rational(7, 32))
    head = choose_head_stage(specs, costs, num_stages=2, num_microbatches=4, seq_len=1)
    assert head == 1  # L % p == 0: every stage carries the same layer work
    sched = build_schedule(specs, kind="helix", num_stages=2, num_microbatches=4, head_stage="auto",
                           costs=costs, seq_len=1)  # validates
    r = simulate(sched, specs, costs, device=unit_device(), seq_len=1)
    assert r.iteration_time > 0
