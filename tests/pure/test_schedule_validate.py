"""validate_schedule over many configurations, property tests, injected faults, lowering steps."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helix_compiler.errors import ScheduleError
from helix_compiler.ir.schedule import Instr, RankProgram
from helix_compiler.ir.segment import POLICIES, chain_specs
from helix_compiler.lowering.baselines import valid_virtual_stages
from helix_compiler.lowering.build import build_schedule, compute_schedule
from helix_compiler.lowering.comm import hoisted_receives, insert_communication
from helix_compiler.lowering.frees import insert_frees
from helix_compiler.lowering.recompute import insert_recompute
from helix_compiler.lowering.validate import validate_schedule


def build(kind, p, L, M, F=2, **kw):
    return build_schedule(chain_specs(L), kind=kind, num_stages=p, num_microbatches=M,
                          num_folds=F, validate=False, **kw)


GRID = [("helix", p, L, M, F) for p, L, M, F in [
    (1, 2, 2, 2), (2, 2, 4, 2), (2, 4, 8, 2), (2, 3, 4, 1), (3, 6, 6, 2), (3, 4, 12, 2),
    (4, 8, 8, 2), (4, 8, 16, 2), (4, 8, 8, 1), (4, 6, 8, 2), (4, 2, 8, 2), (4, 8, 12, 3),
    (5, 7, 10, 2), (6, 12, 12, 2), (8, 16, 16, 2), (8, 8, 8, 1)]] + [
    (kind, p, L, M, 1) for kind in ("gpipe", "1f1b", "zb1p") for p, L, M in [
        (1, 2, 1, ), (2, 4, 2), (2, 3, 5), (4, 8, 4), (4, 8, 9), (4, 6, 8), (8, 8, 8)]] + [
    ("interleaved", p, L, M, 1) for p, L, M in [(2, 4, 2), (2, 8, 6), (4, 8, 8), (4, 16, 12)]]


@pytest.mark.parametrize("kind,p,L,M,F", GRID, ids=[f"{k}-p{p}-L{L}-M{M}-F{F}"
                                                    for k, p, L, M, F in GRID])
def test_grid_is_valid(kind, p, L, M, F):
    s = build(kind, p, L, M, F)
    rep = validate_schedule(s)
    assert rep.steps > 0
    assert s.lowered == ("recompute", "comm", "frees")
    # every wait is on exactly the value the next compute uses: folds never wait for each
    # other and FIFO order per pair equals consumption order
    assert hoisted_receives(s) == 0
    # messages carry their fold
    assert all(i.fold == i.mb % s.num_folds for prog in s.programs for i in prog if i.is_comm)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=st.integers(1, 8), L=st.integers(1, 12), groups=st.integers(1, 2), F=st.integers(1, 3),
       recompute=st.sampled_from(POLICIES), head=st.booleans())
def test_property_random_helix_configs_are_valid(p, L, groups, F, recompute, head):
    M = groups * p * F
    head_stage = (L % p) if head else None
    s = build("helix", p, L, M, F, recompute=recompute, head_stage=head_stage)
    validate_schedule(s)
    for r in range(p):  # FILO: backward order is the reverse forward order (head aside)
        f = [(i.seg, i.mb) for i in s.programs[r] if i.op == "F" and i.seg != "H"]
        b = [(i.seg, i.mb) for i in s.programs[r] if i.op == "B" and i.seg != "H"]
        assert b == f[::-1]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["gpipe", "1f1b", "zb1p", "interleaved"]), p=st.integers(1, 8),
       L=st.integers(1, 16), extra=st.integers(0, 9), recompute=st.sampled_from(POLICIES),
       data=st.data())
def test_property_random_baseline_configs_are_valid(kind, p, L, extra, recompute, data):
    v = None
    if kind == "interleaved":
        if not valid_virtual_stages(L, p):
            with pytest.raises(ScheduleError, match="interleaved"):
                build(kind, p, L, p, recompute=recompute)
            return
        v = data.draw(st.sampled_from(valid_virtual_stages(L, p)))
        M = p * (1 + extra % 3)
    else:
        M = p + extra
    if L < p * (v or 1):
        with pytest.raises(ScheduleError):
            build(kind, p, L, M, virtual_stages=v, recompute=recompute)
        return
    s = build(kind, p, L, M, virtual_stages=v, recompute=recompute)
    validate_schedule(s)
    assert hoisted_receives(s) == 0


# ---------------------------------------------------------------------------- injected faults
def _with(s, r, instrs):
    progs = list(s.programs)
    progs[r] = RankProgram(r, tuple(instrs))
    return replace(s, programs=tuple(progs))


@pytest.fixture(scope="module")
def small():
    return build("helix", 2, 4, 4, 2)


def _expect_grid(err: ScheduleError, marker: str = "!! "):
    msg = str(err)
    assert "step | rank 0" in msg and "| rank 1" in msg
    marked = [ln for ln in msg.splitlines() if ln.startswith(">>")]
    assert len(marked) == 1 and marker in marked[0]
    return msg


def test_valid_small_schedule(small):
    validate_schedule(small)


def test_swapped_recvs_are_misordered(small):
    ins = list(small.programs[1].instrs)
    j, k = [n for n, i in enumerate(ins) if i.op == "RECV" and i.peer == 0][:2]
    ins[j], ins[k] = ins[k], ins[j]
    with pytest.raises(ScheduleError, match="misordered receive") as e:
        validate_schedule(_with(small, 1, ins))
    msg = _expect_grid(e.value)
    assert f"!! {ins[j]}" in msg


def test_missing_send_deadlocks(small):
    ins = list(small.programs[0].instrs)
    j = max(n for n, i in enumerate(ins) if i.op == "SEND" and i.peer == 1 and i.value == "fwd")
    missing = ins.pop(j)
    with pytest.raises(ScheduleError, match="deadlocks") as e:
        validate_schedule(_with(small, 0, ins))
    msg = _expect_grid(e.value, "?? ")
    assert f"?? RECV fwd {missing.seg} m{missing.mb}" in msg
    assert "SEND is missing" in msg


def test_missing_send_in_the_middle_is_misordered(small):
    ins = list(small.programs[0].instrs)
    j = min(n for n, i in enumerate(ins) if i.op == "SEND" and i.peer == 1)
    del ins[j]
    with pytest.raises(ScheduleError, match="misordered|deadlock") as e:
        validate_schedule(_with(small, 0, ins))
    _expect_grid(e.value, "!! " if "misordered" in str(e.value) else "?? ")


def test_backward_before_forward(small):
    ins = list(small.programs[1].instrs)
    j = next(n for n, i in enumerate(ins) if i.op == "B")
    b = ins.pop(j)
    ins.insert(0, b)
    with pytest.raises(ScheduleError, match="backward before its forward") as e:
        validate_schedule(_with(small, 1, ins))
    assert f"!! {b}" in _expect_grid(e.value)


def test_use_after_free(small):
    ins = list(small.programs[0].instrs)
    j = next(n for n, i in enumerate(ins) if i.op == "FREE" and i.value == "stash")
    fr = ins.pop(j)
    ins.insert(next(n for n, i in enumerate(ins) if i.op == "F" and i.seg == fr.seg
                    and i.mb == fr.mb) + 1, fr)
    with pytest.raises(ScheduleError, match="freed before") as e:
        validate_schedule(_with(small, 0, ins))
    _expect_grid(e.value)


def test_wrong_fold_and_missing_backward(small):
    ins = list(small.programs[0].instrs)
    j = next(n for n, i in enumerate(ins) if i.op == "SEND")
    ins[j] = replace(ins[j], fold=1 - ins[j].fold)
    with pytest.raises(ScheduleError, match="fold"):
        validate_schedule(_with(small, 0, ins))
    ins = [i for i in small.programs[0].instrs if not (i.op == "B" and i.seg == "E" and i.mb == 0)]
    with pytest.raises(ScheduleError, match="E m0 has a forward on rank 0 but no backward"):
        validate_schedule(_with(small, 0, ins))


def test_unmatched_send(small):
    ins = list(small.programs[0].instrs) + [Instr("SEND", "E", 0, value="fwd", peer=1, fold=0)]
    with pytest.raises(ScheduleError, match="freed before|unmatched"):
        validate_schedule(_with(small, 0, ins))


# ---------------------------------------------------------------------------- lowering steps
def test_lowering_steps_are_pure_and_ordered():
    base = compute_schedule(8, kind="helix", num_stages=4, num_microbatches=8)
    text = str(base)
    rec = insert_recompute(base, "without_attention")
    com = insert_communication(rec)
    fre = insert_frees(com)
    assert str(base) == text  # inputs untouched
    assert base.lowered == () and fre.lowered == ("recompute", "comm", "frees")
    with pytest.raises(ScheduleError, match="already"):
        insert_communication(com)
    with pytest.raises(ScheduleError, match="already"):
        insert_recompute(rec, "full")
    with pytest.raises(ScheduleError, match="already"):
        insert_frees(fre)


def test_recompute_policies():
    base = compute_schedule(4, kind="helix", num_stages=2, num_microbatches=4)
    counts = {}
    for pol in POLICIES:
        s = insert_recompute(base, pol)
        rs = [i for p in s.programs for i in p if i.op == "R"]
        counts[pol] = rs
        assert s.recompute == pol
    assert counts["none"] == []
    wa = counts["without_attention"]
    assert {i.part for i in wa if i.seg.startswith("A")} == {"pre"}
    assert {i.part for i in wa if not i.seg.startswith("A")} == {"all"}
    assert all(i.seg != "H" for i in wa)  # F(H) right before B(H): nothing to recompute
    # every segment is recomputed once per micro batch, except where the backward directly
    # follows its own forward (the head everywhere; here also stage 1's turn-around op)
    fresh = [(b.seg, b.mb) for prog in base.programs for a, b in zip(prog.instrs[:-1], prog.instrs[1:], strict=True)
             if a.op == "F" and b.op == "B" and (a.seg, a.mb) == (b.seg, b.mb)]
    assert len(fresh) == 4 + 1 and sum(1 for seg, _ in fresh if seg == "H") == 4
    assert len(wa) == 4 * len(base.specs) - len(fresh)
    assert not {(i.seg, i.mb) for i in wa} & set(fresh)
    assert {i.part for i in counts["full"]} == {"all"}
    assert all(i.seg.startswith("A") and i.part == "all" for i in counts["selective"])
    assert len(counts["selective"]) == 4 * 4 - sum(1 for seg, _ in fresh if seg.startswith("A"))
    # R comes right before the backward (or before the RECVs waiting for its gradient)
    s = build("helix", 2, 4, 4, 2)
    before_wait = 0
    for prog in s.programs:
        ins = prog.instrs
        for n, i in enumerate(ins):
            if i.op == "R":
                k = n + 1
                while ins[k].op == "RECV":
                    k += 1
                assert (ins[k].op, ins[k].seg, ins[k].mb) == ("B", i.seg, i.mb)
                before_wait += k > n + 1
            if i.op == "RECV" and i.value == "bwd":
                assert ins[n - 1].op in ("R", "RECV", "FREE", "SEND") or ins[n - 1].is_compute
                nxt = next(x for x in ins[n:] if x.op not in ("RECV",))
                assert nxt.op != "R"  # the recompute never waits for the gradient
    assert before_wait > 0


@pytest.mark.parametrize("kind", ["helix", "1f1b", "zb1p"])
def test_recompute_and_comm_steps_commute(kind):
    """R goes before the RECVs its backward waits on, whichever step runs first."""
    base = compute_schedule(8, kind=kind, num_stages=4, num_microbatches=8,
                            num_folds=2 if kind == "helix" else 1)
    a = insert_communication(insert_recompute(base, "without_attention"))
    b = insert_recompute(insert_communication(base), "without_attention")
    assert a.programs == b.programs


def test_frees_follow_last_use():
    s = build("helix", 2, 4, 4, 2)
    for prog in s.programs:
        ins = prog.instrs
        frees = [n for n, i in enumerate(ins) if i.op == "FREE"]
        assert frees
        for n in frees:
            f = ins[n]
            later = [i for i in ins[n + 1:] if (i.seg, i.mb) == (f.seg, f.mb) and (
                (f.value == "stash" and i.op in ("R", "B", "I", "W"))
                or (f.value in ("fwd", "bwd") and i.op in ("SEND", "RECV") and i.value == f.value))]
            assert not later, f"{f} before a later use {later[0]}"
    stashes = sum(1 for p in s.programs for i in p if i.op == "FREE" and i.value == "stash")
    assert stashes == len(s.specs) * 4


def test_communication_pairs_match():
    s = build("helix", 4, 8, 8, 2)
    sends = [(r, i.peer, i.value, i.seg, i.mb, i.fold) for r, p in enumerate(s.programs)
             for i in p if i.op == "SEND"]
    recvs = [(i.peer, r, i.value, i.seg, i.mb, i.fold) for r, p in enumerate(s.programs)
             for i in p if i.op == "RECV"]
    assert sorted(sends) == sorted(recvs)
    for src in range(4):
        for dst in range(4):
            a = [x[2:] for x in sends if x[:2] == (src, dst)]
            b = [x[2:] for x in recvs if x[:2] == (src, dst)]
            assert a == b  # FIFO order per pair


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(kind="1f1b", num_stages=4, num_microbatches=3),
     r"1f1b: num_microbatches=3 must be >= num_stages=4"),
    (dict(kind="zb1p", num_stages=4, num_microbatches=2), r"zb1p: num_microbatches=2 must be >= 4"
     .replace(">= 4", ">= num_stages=4")),
    (dict(kind="interleaved", num_stages=4, num_microbatches=8, virtual_stages=3),
     r"virtual_stages=3 must be >= 2 and divide the layers per rank "
     r"num_layers/num_stages=8/4=2; valid virtual_stages: \[2\]"),
    (dict(kind="interleaved", num_stages=4, num_microbatches=6, virtual_stages=2),
     r"num_microbatches=6 must be a multiple of num_stages=4"),
    (dict(kind="helix", num_stages=4, num_microbatches=12), r"use 8 or 16"),
    (dict(kind="pipedream", num_stages=4, num_microbatches=8), r"not one of"),
    (dict(kind="1f1b", num_stages=4, num_microbatches=8, head_stage=1), r"only applies to kind='helix'"),
    (dict(kind="helix", num_stages=4, num_microbatches=8, recompute="some"), r"recompute='some'"),
])
def test_invalid_requests_raise_with_values_and_alternatives(kwargs, pattern):
    with pytest.raises(ScheduleError, match=pattern):
        build_schedule(chain_specs(8), **kwargs)


def test_interleaved_uneven_layers_error():
    with pytest.raises(ScheduleError, match=r"num_layers=7 must be a multiple of num_stages=2"):
        build_schedule(chain_specs(7), kind="interleaved", num_stages=2, num_microbatches=4)


def test_specs_must_be_the_chain():
    specs = chain_specs(4)
    with pytest.raises(ScheduleError, match="not the chain"):
        build_schedule(specs[:1] + specs[2:] + specs[1:2], kind="gpipe", num_stages=2,
                       num_microbatches=2)
