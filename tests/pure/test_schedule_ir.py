"""Instructions and schedules as data: text forms round-trip exactly; bad input is rejected."""

from __future__ import annotations

import pytest

from helix_compiler.errors import ScheduleError
from helix_compiler.ir.schedule import (
    COMPUTE_OPS,
    OPS,
    Instr,
    RankProgram,
    Schedule,
    parse_schedule,
    segment_index,
)
from helix_compiler.ir.segment import chain_specs
from helix_compiler.lowering.build import build_schedule

EVERY_KIND = [
    (Instr("F", "A3", 5), "F A3 m5"),
    (Instr("B", "P12", 0), "B P12 m0"),
    (Instr("I", "E", 7), "I E m7"),
    (Instr("W", "H", 3), "W H m3"),
    (Instr("R", "A3", 5, part="all"), "R A3 m5 all"),
    (Instr("R", "A3", 5, part="pre"), "R A3 m5 pre"),
    (Instr("SEND", "A3", 5, value="fwd", peer=2, fold=1), "SEND fwd A3 m5 ->2 f1"),
    (Instr("RECV", "A3", 5, value="fwd", peer=0, fold=1), "RECV fwd A3 m5 <-0 f1"),
    (Instr("SEND", "P2", 4, value="bwd", peer=1, fold=0), "SEND bwd P2 m4 ->1 f0"),
    (Instr("RECV", "P2", 4, value="bwd", peer=3, fold=0), "RECV bwd P2 m4 <-3 f0"),
    (Instr("FREE", "A3", 5, value="stash"), "FREE stash A3 m5"),
    (Instr("FREE", "A3", 5, value="fwd"), "FREE fwd A3 m5"),
    (Instr("FREE", "A3", 5, value="bwd"), "FREE bwd A3 m5"),
]


@pytest.mark.parametrize("instr,text", EVERY_KIND, ids=[t for _, t in EVERY_KIND])
def test_instruction_text_round_trip(instr, text):
    assert str(instr) == text
    assert Instr.parse(text) == instr
    assert Instr.parse(str(instr)) == instr


def test_every_op_is_covered_by_the_round_trip_cases():
    assert {i.op for i, _ in EVERY_KIND} == set(OPS)


@pytest.mark.parametrize("bad", [
    "X A3 m5", "F A3", "F A3 5", "F Q3 m5", "F A0 m1", "R A3 m5", "R A3 m5 half",
    "SEND fwd A3 m5 2 f1", "SEND side A3 m5 ->2 f1", "RECV fwd A3 m5 ->2 f1",
    "FREE stuff A3 m5", "F A3 m-1", ""])
def test_bad_instruction_text_is_rejected(bad):
    with pytest.raises(ScheduleError):
        Instr.parse(bad)


def test_instruction_fields_are_validated():
    with pytest.raises(ScheduleError, match="peer"):
        Instr("SEND", "A1", 0, value="fwd", fold=0)
    with pytest.raises(ScheduleError, match="only SEND/RECV carry peer"):
        Instr("F", "A1", 0, peer=1)
    with pytest.raises(ScheduleError, match="part"):
        Instr("B", "A1", 0, part="all")
    with pytest.raises(ScheduleError, match="takes no value"):
        Instr("F", "A1", 0, value="fwd")
    i = Instr("F", "A1", 0)
    with pytest.raises(AttributeError):
        i.mb = 3  # frozen


def test_segment_index_matches_chain():
    specs = chain_specs(5)
    assert [segment_index(s.name, 5) for s in specs] == [s.index for s in specs]
    with pytest.raises(ScheduleError, match="valid layers are 1..5"):
        segment_index("A6", 5)


@pytest.mark.parametrize("kind,kw", [
    ("helix", dict(num_folds=2)), ("helix", dict(num_folds=1, head_stage=1)),
    ("gpipe", {}), ("1f1b", {}), ("zb1p", {}), ("interleaved", dict(virtual_stages=2))])
@pytest.mark.parametrize("recompute", ["none", "without_attention"])
def test_schedule_text_round_trip(kind, kw, recompute):
    s = build_schedule(chain_specs(4), kind=kind, num_stages=2, num_microbatches=4,
                       recompute=recompute, **kw)
    text = str(s)
    assert text.startswith(f"schedule kind={kind} stages=2 microbatches=4 ")
    assert "rank 0:" in text and "rank 1:" in text
    back = parse_schedule(text)
    assert back == s
    assert str(back) == text


def test_print_shows_each_rank_and_picture_is_compact():
    s = build_schedule(chain_specs(2), kind="1f1b", num_stages=2, num_microbatches=2,
                       recompute="none")
    text = str(s)
    assert "rank 1:\n  RECV fwd P1 m0 <-0 f0\n  F A2 m0" in text
    pic = s.picture()
    lines = pic.splitlines()
    assert lines[1].startswith("r0| E.0 A1.0 P1.0 E.1")
    assert lines[2].startswith("r1| A2.0 P2.0 H.0 b:H.0 b:P2.0 b:A2.0")
    assert all(op not in pic for op in ("SEND", "RECV", "FREE"))


def test_schedule_rejects_bad_programs_and_headers():
    with pytest.raises(ScheduleError, match="ranks 0..1 in order"):
        Schedule("helix", 2, 2, 1, 1, (RankProgram(1, ()), RankProgram(0, ())))
    with pytest.raises(ScheduleError, match="kind"):
        Schedule("pipedream", 1, 1, 1, 1, (RankProgram(0, ()),))
    with pytest.raises(ScheduleError, match="header"):
        parse_schedule("rank 0:\n  F E m0\n")


def test_compute_ops_subset():
    assert set(COMPUTE_OPS) <= set(OPS)
    assert Instr("R", "A1", 0, part="pre").is_compute and not Instr(
        "FREE", "A1", 0, value="fwd").is_compute
