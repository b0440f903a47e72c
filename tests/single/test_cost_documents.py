"""Packed documents (``document_lengths``) and windowed attention in the cost model, the
simulator and the placement: the fraction of the dense scores each kernel computes, exactly."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import sympy  # noqa: E402
from models_for_tests import hf_loss, hf_window_model  # noqa: E402

from helix_compiler import compile_program  # noqa: E402
from helix_compiler.cost.devices import get_device  # noqa: E402
from helix_compiler.cost.model import attention_computed_fraction  # noqa: E402
from helix_compiler.errors import HelixError  # noqa: E402
from helix_compiler.ir.segment import S  # noqa: E402
from helix_compiler.lowering.placement import helix_placement, stage_loads  # noqa: E402
from helix_compiler.lowering.validate import validate_schedule  # noqa: E402
from helix_compiler.models import Llama, LlamaConfig  # noqa: E402
from helix_compiler.sim.costs import attention_fraction, op_times  # noqa: E402

R = sympy.Rational
SEQ = 64
DOCS = (32, 16, 16)
DOCS_CAUSAL = R(32 * 33 // 2 + 2 * (16 * 17 // 2), SEQ * SEQ)  # (528 + 136 + 136) / 4096 = 25/128
WINDOW = 16  # Hugging Face sliding_window=16: helix window (15, 0)
WIN_AT_SEQ = R(WINDOW * SEQ - (WINDOW - 1) * WINDOW // 2, SEQ * SEQ)  # 904/4096
# per document: band(32) = 16*32 - 120 = 392, band(16) = 16*17/2 = 136 (not longer than the window)
WIN_DOCS = R(392 + 136 + 136, SEQ * SEQ)


# ------------------------------------------------------------------ the fraction itself
def test_document_fraction_causal_noncausal_windowed():
    docs = (8, 4, 4)
    assert attention_computed_fraction(16, 16, True, None, docs) == R(36 + 10 + 10, 256)
    assert attention_computed_fraction(S, S, True, None, docs) == R(56, 256)  # the lengths fix s
    assert attention_computed_fraction(S, S, True, (-1, -1), docs) == R(56, 256)
    assert attention_computed_fraction(S, S, False, None, docs) == R(64 + 16 + 16, 256)
    # causal window (3, 0) in each document: band(8) = 4*8 - 6 = 26, band(4) = 4*5/2 = 10
    assert attention_computed_fraction(S, S, True, (3, 0), docs) == R(26 + 10 + 10, 256)
    assert attention_computed_fraction(S, S, True, [3, 0], docs) == R(46, 256)
    # one document: the causal band with its diagonal, s(s+1)/2 / s^2
    assert attention_computed_fraction(S, S, True, None, (16,)) == R(136, 256)
    assert attention_computed_fraction(S, S, False, None, (16,)) == 1
    assert isinstance(attention_computed_fraction(S, S, True, None, docs), sympy.Rational)


def test_fraction_without_documents_is_unchanged():
    assert attention_computed_fraction(S, S, True, None) == R(1, 2)
    assert attention_computed_fraction(S, S, False, None) == 1
    assert attention_computed_fraction(S, S, False, (3, 0)) == 1
    assert attention_computed_fraction(S, 2 * S, True, (3, 0)) == R(1, 2)
    win = attention_computed_fraction(S, S, True, (3, 0))
    assert win.subs(S, 16) == R(4 * 16 - 6, 256) and win.subs(S, 4) == R(10, 16)
    # sq != sk: documents do not apply
    assert attention_computed_fraction(S, 2 * S, True, None, (8, 8)) == R(1, 2)


def test_document_lengths_must_match_the_attention():
    with pytest.raises(HelixError, match="sum to 16, but the attention sees 12"):
        attention_computed_fraction(12, 12, True, None, (8, 4, 4))
    with pytest.raises(HelixError, match="positive"):
        attention_computed_fraction(S, S, True, None, (8, 0))


# ------------------------------------------------------------------ compiled programs
def _llama(**kw):
    model = Llama(LlamaConfig(num_layers=2, hidden=64, heads=4, kv_heads=2, ffn=172))
    return compile_program(model, pp_size=2, seq_len=SEQ, **kw)


@pytest.fixture(scope="module")
def llama_programs():
    return _llama(), _llama(document_lengths=DOCS)


def _attention_part(cost, dev, frac):
    """Seconds of the attention part of F and B at ``frac`` (bf16 attention rate)."""
    n = cost.at(1, SEQ)
    at = dev.attention_rate("bf16")
    return n["attention_flops_fwd"] * frac / at, n["attention_flops_bwd"] * frac / at


def test_compiled_costs_carry_the_document_fraction(llama_programs):
    plain, docs = llama_programs
    assert docs.config.document_lengths == DOCS
    for p_seg, d_seg in zip(plain.segments, docs.segments, strict=True):
        if p_seg.spec.kind == "attn":
            assert d_seg.cost.extra["attention_computed_fraction"] == DOCS_CAUSAL
            assert "attention_computed_fraction" not in p_seg.cost.extra
            assert attention_fraction(d_seg.cost, micro_batch_size=1, seq_len=SEQ) == float(DOCS_CAUSAL)
        else:
            assert "attention_computed_fraction" not in d_seg.cost.extra
        # FLOPs stay dense (FlopCounterMode's count); only the computed fraction differs
        assert d_seg.cost.flops_fwd == p_seg.cost.flops_fwd
        assert d_seg.cost.attention_flops_bwd == p_seg.cost.attention_flops_bwd


def test_simulated_attention_time_shrinks_by_the_document_fraction(llama_programs):
    plain, docs = llama_programs
    dev = get_device("H20")
    kw = dict(micro_batch_size=1, seq_len=SEQ, recompute=plain.config.recompute, specs=plain.specs)
    tp = op_times(plain.costs, dev, **kw)
    td = op_times(docs.costs, dev, **kw)
    for c, seg in enumerate(plain.segments):
        if seg.spec.kind != "attn":
            assert (td.fwd[c], td.bwd[c], td.recompute[c]) == (tp.fwd[c], tp.bwd[c], tp.recompute[c])
            continue
        f_half, b_half = _attention_part(seg.cost, dev, 0.5)
        f_docs, b_docs = _attention_part(seg.cost, dev, float(DOCS_CAUSAL))
        assert f_half > 0 and b_half == pytest.approx(2 * f_half)
        assert tp.fwd[c] - td.fwd[c] == pytest.approx(f_half - f_docs, rel=1e-9)
        assert tp.bwd[c] - td.bwd[c] == pytest.approx(b_half - b_docs, rel=1e-9)
        assert tp.bwd_input[c] - td.bwd_input[c] == pytest.approx(b_half - b_docs, rel=1e-9)
        # the attention part itself is smaller by exactly DOCS_CAUSAL / (1/2)
        other = tp.fwd[c] - f_half
        assert (td.fwd[c] - other) / (tp.fwd[c] - other) == pytest.approx(float(DOCS_CAUSAL / R(1, 2)), rel=1e-9)
    # the whole iteration (HelixProgram.simulate): every attention F and B of every micro
    # batch is shorter by that much, the rest is unchanged
    rp, rd = plain.simulate(device="H20"), docs.simulate(device="H20")
    M = plain.config.num_microbatches
    saved = sum(M * ((tp.fwd[c] - td.fwd[c]) + (tp.bwd[c] - td.bwd[c]))
                for c, seg in enumerate(plain.segments) if seg.spec.kind == "attn")
    assert saved > 0
    assert sum(rp.busy) - sum(rd.busy) == pytest.approx(saved, rel=1e-9)
    index = {s.name: i for i, s in enumerate(docs.specs)}
    forwards = [ev for ev in rd.events if ev.instr.op == "F" and ev.instr.seg.startswith("A")]
    assert len(forwards) == 2 * M
    for ev in forwards:
        assert ev.end - ev.start == pytest.approx(td.fwd[index[ev.instr.seg]], rel=1e-12)
    assert rd.iteration_time < rp.iteration_time


def test_placement_with_documents_is_valid(llama_programs):
    _, docs = llama_programs
    validate_schedule(docs.schedule)
    auto = docs.reschedule(head_stage="auto")
    validate_schedule(auto.schedule)
    assert auto.config.document_lengths == DOCS
    # the loads the head-stage choice reads count attention at the document fraction
    c = docs.config
    pl = helix_placement(2, c.pp_size, c.num_microbatches, c.num_folds)
    plain_loads = stage_loads(pl, llama_programs[0].costs, micro_batch_size=1, seq_len=SEQ)
    doc_loads = stage_loads(pl, docs.costs, micro_batch_size=1, seq_len=SEQ)
    attn_work = sum(c.num_microbatches * (n["attention_flops_fwd"] + n["attention_flops_bwd"])
                    for s in docs.segments if s.spec.kind == "attn" for n in [s.cost.at(1, SEQ)])
    assert sum(plain_loads) - sum(doc_loads) == pytest.approx(attn_work * float(R(1, 2) - DOCS_CAUSAL), rel=1e-12)


def test_document_lengths_must_sum_to_seq_len():
    with pytest.raises(HelixError, match="summing to"):
        _llama(document_lengths=(32, 16))


# ------------------------------------------------------------------ windowed attention
@pytest.fixture(scope="module")
def window_programs():
    model = hf_window_model("mistral", sliding_window=WINDOW)  # every layer windowed
    return (compile_program(model, pp_size=2, seq_len=SEQ, loss_fn=hf_loss),
            compile_program(model, pp_size=2, seq_len=SEQ, loss_fn=hf_loss, document_lengths=DOCS))


def test_simulator_uses_the_window_fraction(window_programs):
    """Before, the simulator took a windowed kernel for a plain causal one (1/2); now it
    uses band(s)/s^2 at the compiled seq_len, and per document with packed documents."""
    win, win_docs = window_programs
    dev = get_device("H20")
    mm, at = dev.matmul_rate("bf16"), dev.attention_rate("bf16")
    kw = dict(micro_batch_size=1, seq_len=SEQ, recompute=win.config.recompute, specs=win.specs)
    t, td = op_times(win.costs, dev, **kw), op_times(win_docs.costs, dev, **kw)
    attn = [c for c, s in enumerate(win.specs) if s.kind == "attn"]
    assert len(attn) == 2
    for c in attn:
        cost = win.segments[c].cost
        assert sympy.sympify(cost.extra["attention_computed_fraction"]).subs(S, SEQ) == WIN_AT_SEQ
        assert win_docs.segments[c].cost.extra["attention_computed_fraction"] == WIN_DOCS
        n = cost.at(1, SEQ)
        for frac, times in ((WIN_AT_SEQ, t), (WIN_DOCS, td)):
            assert times.fwd[c] == pytest.approx((n["flops_fwd"] - n["attention_flops_fwd"]) / mm
                                                 + n["attention_flops_fwd"] * float(frac) / at, rel=1e-12)
            assert times.bwd[c] == pytest.approx((n["flops_bwd"] - n["attention_flops_bwd"]) / mm
                                                 + n["attention_flops_bwd"] * float(frac) / at, rel=1e-12)
    r, rd = win.simulate(device="H20"), win_docs.simulate(device="H20")
    assert rd.iteration_time < r.iteration_time
    validate_schedule(win_docs.schedule)
