"""Placement: the helix rule (HELIXPIPE.md 1.2/1.3) and layer-wise baselines."""

from __future__ import annotations

import pytest

from helix_compiler.errors import ScheduleError
from helix_compiler.ir.segment import chain_specs
from helix_compiler.lowering.placement import (
    choose_head_stage,
    helix_placement,
    layer_partition,
    layerwise_placement,
)
from helix_compiler.sim.costs import uniform_chain_costs

# HELIXPIPE.md 1.3: p = 4, L = 8, entry = stage running A(l) for offsets d = 0..3
ATTN_TABLE = {1: [1, 2, 3, 0], 2: [2, 3, 0, 1], 3: [3, 0, 1, 2], 4: [0, 1, 2, 3],
              5: [1, 2, 3, 0], 6: [2, 3, 0, 1], 7: [3, 0, 1, 2], 8: [0, 1, 2, 3]}


def test_attention_placement_matches_reference_table():
    pl = helix_placement(8, 4, 16, 2)
    for layer, stages in ATTN_TABLE.items():
        for m in range(16):
            d = (m % 8) // 2
            assert pl.offset(m) == d
            assert pl.stage(2 * layer - 1, m) == stages[d]


def test_parameter_chunks_embed_final_head():
    pl = helix_placement(8, 4, 8, 2)
    for m in range(8):
        assert pl.stage(0, m) == 0  # E
        assert pl.stage(16, m) == 0  # P8 (final) on stage 0
        assert pl.stage(17, m) == 0  # H
        for layer in range(1, 8):
            assert pl.stage(2 * layer, m) == layer % 4
    assert helix_placement(8, 4, 8, 2, head_stage=3).stage(17, 5) == 3


def test_path_of_one_micro_batch_matches_reference():
    # HELIXPIPE.md 1.3, d = 1: S0:E -> S2:A1 -> S1:P1 -> S3:A2 -> S2:P2 -> S0:A3 -> S3:P3 -> S1:A4
    pl = helix_placement(8, 4, 8, 2)
    m = 2  # offset 1
    assert [pl.stage(c, m) for c in range(8)] == [0, 2, 1, 3, 2, 0, 3, 1]


def test_transfers_are_local_at_the_extreme_offsets():
    pl = helix_placement(8, 4, 8, 2)
    for layer in range(1, 8):
        a, pre, post = 2 * layer - 1, 2 * layer - 2, 2 * layer
        assert pl.stage(a, 0) == pl.stage(post, 0)  # d = 0: F2 local
        assert pl.stage(a, 6) == pl.stage(pre, 6)  # d = p-1: F1 local


def test_uneven_layers_cyclic_dealing():
    pl = helix_placement(6, 4, 8, 2)
    owners = [pl.stage(2 * layer, 0) for layer in range(1, 6)]
    assert owners == [1, 2, 3, 0, 1]
    counts = [sum(1 for layer in range(1, 7) if pl.stage(2 * layer, 0) == r) for r in range(4)]
    assert counts == [2, 2, 1, 1]  # stage 0 also owns P6 (final)


def test_layer_partition_and_layerwise_placement():
    assert layer_partition(8, 4) == [(1, 2), (3, 4), (5, 6), (7, 8)]
    assert layer_partition(7, 3) == [(1, 3), (4, 5), (6, 7)]
    with pytest.raises(ScheduleError, match="num_layers=2 into 4"):
        layer_partition(2, 4)
    pl = layerwise_placement(8, 4, 4)
    assert [pl.stage(c, 0) for c in range(18)] == [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3,
                                                   3, 3, 3]
    iv = layerwise_placement(8, 2, 4, virtual_stages=2)
    # virtual stages 0..3 own layers (1,2), (3,4), (5,6), (7,8) and live on ranks 0,1,0,1
    assert [iv.stage(2 * layer, 0) for layer in range(1, 9)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert iv.chunk[-1] == 3 and iv.stage(17, 0) == 1  # H with the last layer


def test_helix_placement_errors():
    with pytest.raises(ScheduleError, match="use 8 or 16"):
        helix_placement(8, 4, 12, 2)
    with pytest.raises(ScheduleError, match="num_stages=0"):
        helix_placement(8, 0, 8, 2)


def test_choose_head_stage_picks_least_loaded():
    specs = chain_specs(8)
    costs = uniform_chain_costs(8, embed_fwd=0.5)
    assert choose_head_stage(specs, costs, num_stages=4, num_microbatches=8, seq_len=1) == 1
    # L=6 on p=4: stages 2 and 3 own one parameter chunk less; the lowest of them wins
    specs6 = chain_specs(6)
    costs6 = uniform_chain_costs(6)
    assert choose_head_stage(specs6, costs6, num_stages=4, num_microbatches=8, seq_len=1) == 2


def test_describe_is_a_table():
    text = helix_placement(8, 4, 8, 2).describe()
    assert text.splitlines()[2].split("|")[1].split() == ["1", "1", "2", "2", "3", "3", "0", "0"]
