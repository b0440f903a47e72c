"""The recompute policy table (``ir.recompute``) and its readers: the lowering's R
instructions, the synthetic chain costs and the simulator's recompute times follow it."""

from __future__ import annotations

import pytest

from helix_compiler.errors import HelixError, ScheduleError
from helix_compiler.ir import recompute as rc
from helix_compiler.ir.segment import KINDS, POLICIES, chain_specs
from helix_compiler.lowering.build import build_schedule
from helix_compiler.lowering.recompute import insert_recompute
from helix_compiler.sim.costs import op_times, uniform_chain_costs, unit_device


def test_table_covers_every_policy_and_kind():
    assert set(rc.RULES) == {(p, k) for p in POLICIES for k in KINDS}
    for (p, k), r in rc.RULES.items():
        assert (r.policy, r.kind) == (p, k)
        assert rc.policy_for(p, k) is r
        assert rc.recomputes(p, k) == (r.part is not None)


def test_helixpipe_policy_is_recompute_without_attention():
    """HELIXPIPE.md 3: never rerun the attention forward; keep (out, lse); rerun the rest."""
    attn = rc.policy_for("without_attention", "attn")
    assert attn.part == "pre" and attn.stashes_attention and not attn.reruns_attention
    assert attn.stash == rc.STASH_INPUTS_ATTENTION and attn.rerun == rc.RERUN_ALL_BUT_ATTENTION
    for kind in ("embed", "param", "final", "head"):
        r = rc.policy_for("without_attention", kind)
        assert r.part == "all" and r.stash == rc.STASH_INPUTS and not r.stashes_attention
    for kind in KINDS:
        assert not rc.recomputes("none", kind) and rc.policy_for("none", kind).stash == rc.STASH_ALL
        assert rc.recompute_part("full", kind) == "all" and rc.reruns_attention("full", kind)
    assert [k for k in KINDS if rc.recomputes("selective", k)] == ["attn"]


def test_saved_and_rerun_parts():
    parts = dict(all=100, inputs=10, attention=3)
    got = {p: rc.policy_for(p, "attn").saved(**parts) for p in POLICIES}
    assert got == {"none": 100, "without_attention": 13, "full": 10, "selective": 97}
    got = {p: rc.policy_for(p, "attn").rerun_flops(forward=50, attention=20) for p in POLICIES}
    assert got == {"none": 0, "without_attention": 30, "full": 50, "selective": 20}
    got = {p: rc.policy_for(p, "param").saved(**parts) for p in POLICIES}
    assert got == {"none": 100, "without_attention": 10, "full": 10, "selective": 100}


def test_part_rules_are_what_the_executor_does():
    assert rc.part_rule(None) == rc.PartRule(None, True, "direct", None, rc.STASH_ALL)
    assert rc.part_rule("all") == rc.PartRule("all", False, "direct", "direct", rc.STASH_INPUTS)
    assert rc.part_rule("pre") == rc.PartRule("pre", False, "record", "replay", rc.STASH_INPUTS_ATTENTION)
    with pytest.raises(HelixError, match="R part 'attn'"):
        rc.part_rule("attn")


def test_only_the_known_mismatch_between_counted_and_run():
    """Selective on attention is counted Megatron-style but runs as R all (see the module
    docstring); any other disagreement between a rule and its R part is a bug."""
    assert rc.mismatches() == rc.KNOWN_MISMATCHES == {("selective", "attn")}


def test_bad_policy_and_kind_name_the_choices():
    with pytest.raises(HelixError, match=r"recompute='some' is not a policy; use one of \['none'"):
        rc.policy_for("some", "attn")
    with pytest.raises(HelixError, match="segment kind 'mlp'"):
        rc.policy_for("full", "mlp")
    base = build_schedule(chain_specs(2), kind="helix", num_stages=2, num_microbatches=4, recompute="none")
    with pytest.raises(ScheduleError, match="recompute='some'"):
        insert_recompute(base, "some")  # "none" inserted no R: the policy check is what fails
    assert "without_attention  attn   pre" in rc.describe()


@pytest.mark.parametrize("kind", ["helix", "1f1b", "zb1p"])
@pytest.mark.parametrize("policy", POLICIES)
def test_lowering_inserts_the_tables_parts(kind, policy):
    specs = chain_specs(4)
    s = build_schedule(specs, kind=kind, num_stages=2, num_microbatches=4,
                       num_folds=2 if kind == "helix" else 1, recompute=policy)
    by_name = {sp.name: sp.kind for sp in specs}
    rs = [i for prog in s.programs for i in prog if i.op == "R"]
    for i in rs:
        assert i.part == rc.recompute_part(policy, by_name[i.seg]), i
    recomputed_kinds = {by_name[i.seg] for i in rs}
    expected = {k for k in KINDS if rc.recomputes(policy, k)}
    # the head's backward follows its forward on its rank: never recomputed
    assert recomputed_kinds == expected - {"head"}


@pytest.mark.parametrize("policy", POLICIES)
def test_synthetic_costs_and_sim_times_follow_the_table(policy):
    core, pre = 3.0, 1.0
    costs = uniform_chain_costs(2, attn_fwd=core + pre, attn_pre_fwd=pre, param_fwd=2.0,
                                attn_saved=8.0, param_saved=4.0, recompute_saved_fraction=0.25)
    specs = chain_specs(2)
    t = op_times(costs, unit_device(), micro_batch_size=1, seq_len=1, recompute=policy)
    for k, (spec, c) in enumerate(zip(specs, costs, strict=True)):
        r = rc.policy_for(policy, spec.kind)
        fwd, att = float(c.flops_fwd), float(c.attention_flops_fwd)
        assert float(c.recompute_flops[policy]) == r.rerun_flops(forward=fwd, attention=att)
        full = float(c.saved_bytes["none"])
        assert float(c.saved_bytes[policy]) == (full if r.stash == rc.STASH_ALL else full / 4)
        assert t.recompute[k] == r.rerun_flops(forward=fwd, attention=att)  # unit device: s = FLOPs
    a1 = specs.index(next(s for s in specs if s.kind == "attn"))
    assert t.recompute[a1] == {"none": 0.0, "without_attention": pre, "full": pre + core,
                               "selective": core}[policy]
