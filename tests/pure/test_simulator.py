"""The discrete-event simulator: exact bubble formulas, memory balance, latency hiding by
folds, outputs (PNG timeline, Chrome trace) and device descriptions."""

from __future__ import annotations

import bisect
import dataclasses
import json
from fractions import Fraction

import pytest

from helix_compiler.cost.devices import PRESETS, DeviceSpec, get_device, load_device_profile
from helix_compiler.errors import HelixError, ScheduleError
from helix_compiler.ir.schedule import RECV_LOOKAHEAD
from helix_compiler.ir.segment import chain_specs
from helix_compiler.lowering.build import build_schedule
from helix_compiler.sim import OpTimes, simulate, simulate_times, uniform_chain_costs, unit_device
from helix_compiler.sim.costs import op_times


def run(kind, p, L, M, F=1, *, recompute="none", device=None, costs=None, recv_lookahead=0, **kw):
    """Simulate with the paper's memory model by default (no receive posted ahead)."""
    specs = chain_specs(L)
    costs = costs or uniform_chain_costs(L, attn_fwd=3, param_fwd=1)
    if kw.get("head_stage") == "auto":
        kw.update(costs=costs, seq_len=1)
    s = build_schedule(specs, kind=kind, num_stages=p, num_microbatches=M, num_folds=F,
                       recompute=recompute, **kw)
    return simulate(s, specs, costs, device=device or unit_device(), seq_len=1, recv_lookahead=recv_lookahead)


# ---------------------------------------------------------------------------- bubbles
@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,L,M", [(2, 4, 2), (2, 4, 5), (4, 8, 4), (4, 8, 13), (8, 8, 8)])
def test_gpipe_1f1b_bubble_is_exact(kind, p, L, M):
    r = run(kind, p, L, M)
    stage = r.busy[0]
    assert all(b == stage for b in r.busy)  # uniform chain: every stage has the same work
    assert r.iteration_time == (M + p - 1) * stage / M  # exact in floats (small integers)
    ratio = Fraction(sum(r.iteration_time - b for b in r.busy)) / Fraction(p * r.iteration_time)
    assert ratio == Fraction(p - 1, M + p - 1)
    assert r.bubble_ratio == pytest.approx((p - 1) / (M + p - 1), rel=1e-15)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
def test_recompute_overlaps_the_gradient_wait(kind):
    """R is placed before the RECV of the gradient, so recomputation can run while the
    gradient is in flight: the iteration is no longer than the formula with the recompute
    folded into t_b, and strictly shorter for 1F1B's cool-down."""
    p, L, M = 4, 8, 8
    r = run(kind, p, L, M, recompute="without_attention")
    stage = max(r.busy)
    assert r.iteration_time <= (M + p - 1) * stage / M
    if kind == "1f1b":
        assert r.iteration_time < (M + p - 1) * stage / M


def test_zero_bubble_and_interleaved_beat_1f1b():
    base = run("1f1b", 4, 8, 8).iteration_time
    assert run("zb1p", 4, 8, 8).iteration_time < base
    assert run("interleaved", 4, 8, 8, virtual_stages=2).iteration_time < base


HELIX_CASES = [(2, 2, 4, 8), (3, 2, 6, 12), (4, 1, 8, 8), (4, 2, 8, 16), (4, 3, 4, 12),
               (4, 4, 8, 32), (6, 2, 6, 12), (8, 1, 8, 16), (8, 2, 16, 16)]


@pytest.mark.parametrize("p,F,L,M", HELIX_CASES)
@pytest.mark.parametrize("t_attn", [1, 3])  # t_attn >= t_P
def test_helix_bubble_formula(p, F, L, M, t_attn):
    """HELIXPIPE.md 1.5 with E, H negligible and PL = P: bubble = T - busy =
    [(p-1) + (F-1)(p-2)] (t_f(P) + t_b(P)), independent of attention time, L and M."""
    r = run("helix", p, L, M, F, costs=uniform_chain_costs(L, attn_fwd=t_attn, param_fwd=1))
    assert len(set(r.busy)) == 1
    assert r.iteration_time - r.busy[0] == ((p - 1) + (F - 1) * (p - 2)) * (1 + 2)


@pytest.mark.parametrize("p,F,L,M", [(4, 2, 8, 8), (4, 2, 8, 16), (4, 1, 8, 8), (8, 2, 16, 16),
                                     (3, 2, 6, 12)])
@pytest.mark.parametrize("e,h,fin", [(0.25, 0, 1), (0, 0.5, 1), (0, 0, 1.5), (0.25, 0.5, 1.25),
                                     (0, 2, 1)])
def test_helix_stage0_extras(p, F, L, M, e, h, fin):
    """With stage-0 work (E = e, H = h, PL = fin forward; backward 2x), stage 0 is the
    bottleneck and, zero latency, t(X) = t_f(X) + t_b(X):

        T = busy_r + [(p-1) + (F-1)(p-2)] t(P) + M (t(H) + t(PL) - t(P)) + (M - pF + 1) t(E)

    for every stage r > 0: the extras are the head of every micro batch, the final chunk's
    surplus over a regular chunk, and the embedding of all but pF-1 micro batches (the first
    pF-1 embeddings and their backwards run while stage 0 would idle in warm-up / cool-down;
    this holds while (pF-1) t(E) <= the base bubble)."""
    costs = uniform_chain_costs(L, attn_fwd=3, param_fwd=1, embed_fwd=e, head_fwd=h,
                                final_fwd=fin)
    r = run("helix", p, L, M, F, costs=costs)
    base = ((p - 1) + (F - 1) * (p - 2)) * 3
    assert (p * F - 1) * 3 * e <= base
    extra = M * (3 * h + 3 * (fin - 1)) + (M - p * F + 1) * 3 * e
    for rank in range(1, p):
        assert r.iteration_time - r.busy[rank] == pytest.approx(base + extra, abs=1e-9)
    assert r.busy[0] - r.busy[1] == pytest.approx(M * 3 * (e + h + fin - 1))


def test_helix_beats_1f1b_when_attention_dominates_and_gap_grows_with_s():
    L, p = 8, 4
    ratios = []
    for s in (1, 4, 16):
        costs = uniform_chain_costs(L, attn_fwd=0.5, attn_pre_fwd=0.25, param_fwd=1,
                                    scale_with_s=True)
        specs = chain_specs(L)
        times = {}
        for kind, F in (("helix", 2), ("1f1b", 1)):
            sch = build_schedule(specs, kind=kind, num_stages=p, num_microbatches=8,
                                 num_folds=F, recompute="none")
            times[kind] = simulate(sch, specs, costs, device=unit_device(), seq_len=s).iteration_time
        ratios.append(times["1f1b"] / times["helix"])
    assert ratios[0] < ratios[1] < ratios[2] and ratios[2] > 1.2


def _latency_growth(F: int, recv_lookahead: int) -> tuple[float, float]:
    b = []
    for delta in (0.0, 1.0):
        costs = uniform_chain_costs(8, attn_fwd=3, param_fwd=1, out_bytes=1)
        r = run("helix", 4, 8, 16, F, costs=costs, device=unit_device(latency=delta),
                recv_lookahead=recv_lookahead)
        b.append(r.iteration_time - max(r.busy))
    return b[0], b[1] - b[0]


def test_folds_hide_latency():
    """HELIXPIPE.md 2.5 (p=4, L=8, M=16, attention 3, chunk 1): with F=1 every hop's latency is
    exposed; F=2 overlaps one fold's messages with the other fold's compute. Sends are
    rendezvous, so this needs the receives posted ahead, as the reference posts "the next
    receive" with each send and the runtime posts RECV_LOOKAHEAD receives ahead."""
    grow = {}
    for F in (1, 2):
        bubble, grow[F] = _latency_growth(F, RECV_LOOKAHEAD)
        assert bubble == {1: 9, 2: 15}[F]
    assert grow[1] > 100  # ~ one latency per hop on the critical path (2.5 says 128)
    assert grow[2] < grow[1] / 10


def test_a_receive_posted_only_when_needed_exposes_the_latency():
    """The rendezvous: data flows once the receiver has posted, so with no receive posted
    ahead even F=2 waits a latency per hop."""
    assert _latency_growth(2, 0)[1] > 10 * _latency_growth(2, 1)[1]


def test_a_sent_buffer_is_held_until_the_receiver_posts_its_receive():
    """gloo and NCCL sends are rendezvous: rank 0 (forwards of 1) keeps each output it sent
    until rank 1 (forwards of 10 per segment, receives posted only when reached) posts the
    matching receive, and the data arrives from then on."""
    specs = chain_specs(2)
    sched = build_schedule(specs, kind="gpipe", num_stages=2, num_microbatches=4, recompute="full")
    slow = {i.seg for i in sched.programs[1].instrs if i.op == "F"}
    times = dataclasses.replace(OpTimes.uniform(len(specs)), out_bytes=(1.0,) * len(specs),
                                fwd=tuple(10.0 if sp.name in slow else 1.0 for sp in specs))

    def held_at(res, t):  # rank 0's bytes at time t
        tl = res.memory_timeline[0]
        return tl[bisect.bisect_right([x for x, _ in tl], t) - 1][1]

    late = simulate_times(sched, times, recv_lookahead=0)
    # m0 was posted at 0; m_k (k > 0) once rank 1 is done with m_(k-1): 3 + 30 k
    assert [m.arrival for m in late.messages if m.src == 0] == [3.0, 33.0, 63.0, 93.0]
    assert held_at(late, 11.5) == 2  # m1 and m2 sent (at 6 and 9), not yet received
    assert [len(m) for m in late.memory_after] == [len(p.instrs) for p in late.schedule.programs]
    early = simulate_times(sched, times, recv_lookahead=8)  # everything posted at the start
    assert [m.arrival for m in early.messages if m.src == 0] == [3.0, 6.0, 9.0, 12.0]
    assert held_at(early, 11.5) == 0


def test_moving_a_heavy_head_off_stage0_helps():
    costs = uniform_chain_costs(16, attn_fwd=3, param_fwd=1, embed_fwd=0.1, head_fwd=1)
    t0 = run("helix", 8, 16, 16, 2, costs=costs).iteration_time
    t_auto = run("helix", 8, 16, 16, 2, costs=costs, head_stage="auto").iteration_time
    assert t_auto < 0.97 * t0


# ---------------------------------------------------------------------------- counts, memory
def test_each_stage_runs_ML_over_p_attention_and_chunks_in_the_sim():
    r = run("helix", 4, 8, 16, 2)
    for rank in range(4):
        cats = [e.category for e in r.events if e.rank == rank and e.instr.op == "F"]
        assert cats.count("fwd_attn") == 16 * 8 // 4
        assert cats.count("fwd") == 16 * 8 // 4


@pytest.mark.parametrize("p,F,L,M", [(4, 2, 8, 8), (4, 2, 8, 16), (8, 2, 16, 16), (4, 1, 12, 8)])
def test_helix_peak_activation_memory_is_equal_across_stages(p, F, L, M):
    costs = uniform_chain_costs(L, attn_fwd=3, param_fwd=1, attn_saved=3, param_saved=2)
    r = run("helix", p, L, M, F, costs=costs)
    assert r.peak_memory_bytes == [M * (L // p) * 5.0] * p
    # with recomputation the stash is still balanced; the peaks differ only by the one
    # segment each stage rematerializes at the turn from forward to backward
    r = run("helix", p, L, M, F, costs=costs, recompute="without_attention")
    stash = M * (L // p) * (0.25 * 3 + 0.25 * 2)
    assert all(stash <= x <= stash + 0.75 * 3 for x in r.peak_stash_bytes)


def test_1f1b_memory_decreases_with_stage_and_zb1p_holds_p():
    costs = uniform_chain_costs(8, attn_fwd=3, param_fwd=1, attn_saved=3, param_saved=2)
    r = run("1f1b", 4, 8, 8, costs=costs)
    per_mb = 2 * 5.0  # two layers per stage
    assert r.peak_memory_bytes == [(4 - k) * per_mb for k in range(4)]
    z = run("zb1p", 4, 8, 8, costs=costs)
    assert z.peak_memory_bytes == [4 * per_mb] * 4


def test_final_hidden_states_wait_on_stage0_until_the_head():
    # 2.6 / 3: stage 0 keeps the final hidden state of every micro batch until its backward
    costs = uniform_chain_costs(8, attn_fwd=3, param_fwd=1, attn_saved=3, param_saved=2,
                                out_bytes=1)
    r = run("helix", 4, 8, 8, 2, costs=costs)
    assert r.peak_memory_bytes[0] - r.peak_stash_bytes[0] == 8


@pytest.mark.parametrize("lookahead", [1, 2, 3])
def test_receives_posted_ahead_count_from_their_post(lookahead):
    # the runtime posts each receive `lookahead` RECVs early: stage 0, at the peak above, also
    # holds the buffers of the next `lookahead` gradients it is about to receive
    costs = uniform_chain_costs(8, attn_fwd=3, param_fwd=1, attn_saved=3, param_saved=2,
                                out_bytes=1)
    r = run("helix", 4, 8, 8, 2, costs=costs, recv_lookahead=lookahead)
    assert r.peak_memory_bytes[0] - r.peak_stash_bytes[0] == 8 + lookahead


def test_communication_volume():
    costs = uniform_chain_costs(8, out_bytes=2)
    r = run("1f1b", 4, 8, 8, costs=costs)
    assert r.comm_bytes == 2 * (4 - 1) * 8 * 2  # one boundary per stage pair, fwd + bwd
    h = run("helix", 4, 8, 8, 2, costs=costs)
    assert h.comm_bytes == 2 * 2 * sum(1 for m in h.messages if m.instr.value == "fwd")
    assert sum(h.comm_bytes_per_rank) == h.comm_bytes


def test_bandwidth_serializes_a_ranks_sends():
    costs = uniform_chain_costs(4, out_bytes=10)
    fast = run("gpipe", 2, 4, 4, costs=costs, device=unit_device(bandwidth=1e9)).iteration_time
    slow = run("gpipe", 2, 4, 4, costs=costs, device=unit_device(bandwidth=1.0)).iteration_time
    assert slow > fast + 10


# ---------------------------------------------------------------------------- outputs
def test_timeline_png_and_chrome_trace(tmp_path):
    r = run("helix", 4, 8, 8, 2, recompute="without_attention")
    png = r.write_timeline(tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    mem = r.write_memory_plot(tmp_path / "m.png")
    assert mem.read_bytes()[:4] == b"\x89PNG"
    tr = json.loads(r.write_chrome_trace(tmp_path / "t.json").read_text())
    ev = tr["traceEvents"]
    xs = [e for e in ev if e["ph"] == "X" and e["cat"] != "comm"]
    assert len(xs) == len(r.events)
    assert {e["tid"] for e in xs} == {0, 2, 4, 6}
    assert max(e["ts"] + e["dur"] for e in xs) == pytest.approx(r.iteration_time * 1e6)
    assert any(e["ph"] == "C" for e in ev) and any(e["ph"] == "s" for e in ev)
    assert "recompute" in {e["cat"] for e in xs}
    assert "rank 3" in r.summary()


def test_slot_grid_picture_for_baselines():
    from helix_compiler.sim.engine import format_slot_grid, slot_grid

    s = build_schedule(chain_specs(4), kind="1f1b", num_stages=2, num_microbatches=2,
                       recompute="none")
    grid = slot_grid(s)
    assert grid[0] == ["E.0", ""]
    text = format_slot_grid(grid)
    assert text.splitlines()[0].startswith("slot | stage 0")


# ---------------------------------------------------------------------------- devices
def test_presets_and_lookup():
    assert set(PRESETS) == {"H20", "H100", "H200", "B200", "A800"}
    assert get_device("h20") is PRESETS["H20"] and get_device("b200") is PRESETS["B200"]
    assert PRESETS["H20"].peak("bf16") == 148e12
    with pytest.raises(HelixError, match=r"unknown device 'B300'; presets are \['A800', 'B200', 'H100', "
                                         r"'H20', 'H200'\] or 'measured'"):
        get_device("B300")
    with pytest.raises(HelixError, match="profile="):
        get_device("measured")
    with pytest.raises(HelixError, match="no peak for dtype='fp8'"):
        PRESETS["A800"].peak("fp8")


def test_h200_and_b200_datasheet_presets():
    h100, h200, b200 = PRESETS["H100"], PRESETS["H200"], PRESETS["B200"]
    # H200: the H100 SXM's compute, 141 GB HBM3e at 4.8 TB/s
    assert h200.peak_flops == h100.peak_flops and h200.matmul_fraction == h100.matmul_fraction
    assert (h200.memory_bytes, h200.memory_bandwidth) == (141e9, 4.8e12)
    assert h200.intra_node_bandwidth == h100.intra_node_bandwidth
    # B200: ~2.25 PFLOPS bf16 dense, 192 GB HBM3e at 8 TB/s, NVLink 5 1.8 TB/s (900 GB/s a way)
    assert b200.peak("bf16") == 2.25e15 and b200.peak("fp8") == 2 * b200.peak("bf16")
    assert (b200.memory_bytes, b200.memory_bandwidth) == (192e9, 8e12)
    assert b200.intra_node_bandwidth == 900e9 == 2 * h100.intra_node_bandwidth
    # same schedule and costs: faster compute, same activations
    a = run("helix", 2, 4, 4, 2, device=h100)
    b = run("helix", 2, 4, 4, 2, device=b200)
    assert b.iteration_time < a.iteration_time and b.peak_memory_bytes == a.peak_memory_bytes


def test_memory_warnings_name_the_ranks_over_the_device_memory():
    costs = uniform_chain_costs(4, attn_fwd=3, param_fwd=1, attn_saved=2.0, param_saved=1.0)
    r = run("1f1b", 2, 4, 4, costs=costs)
    peaks = r.peak_memory_bytes
    assert peaks[0] > peaks[1] > 0  # 1F1B: stage 0 holds the most
    assert r.memory_warnings() == []  # the unit device has unlimited memory
    assert r.memory_warnings(max(peaks)) == []  # at the limit is not over it
    between = (peaks[0] + peaks[1]) / 2
    (w,) = r.memory_warnings(between)
    assert w.startswith("rank 0: peak activations") and "before parameters" in w
    assert [x.split(":")[0] for x in r.memory_warnings(min(peaks) / 2)] == ["rank 0", "rank 1"]
    r.meta["device_memory_bytes"] = between  # what simulate() records from the device
    assert len(r.memory_warnings()) == 1
    r.meta["device_memory_bytes"] = 0.0  # a profile without memory_gb: unknown, no warning
    assert r.memory_warnings() == []


def test_measured_profile_round_trip(tmp_path):
    d = PRESETS["A800"]
    path = tmp_path / "prof.json"
    path.write_text(json.dumps(d.to_profile()))
    m = get_device("measured", profile=path)
    assert isinstance(m, DeviceSpec)
    for f in ("matmul_fraction", "attention_fraction", "gpus_per_node"):
        assert getattr(m, f) == getattr(d, f)
    for f in ("memory_bandwidth", "intra_node_bandwidth", "inter_node_latency"):
        assert getattr(m, f) == pytest.approx(getattr(d, f))
    assert m.peak("bf16") == pytest.approx(d.peak("bf16"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"peak_tflops": {"bf16": 1}}))
    with pytest.raises(HelixError, match="lacks key"):
        load_device_profile(bad)


def test_device_rates_drive_durations():
    costs = uniform_chain_costs(2, attn_fwd=4, attn_pre_fwd=1, param_fwd=2, causal_factor=0.5)
    t = op_times(costs, get_device("H100"), micro_batch_size=1, seq_len=1)
    mm, at = 989e12 * 0.65, 989e12 * 0.50
    assert t.fwd[1] == pytest.approx(1 / mm + 3 * 0.5 / at)
    assert t.fwd[2] == pytest.approx(2 / mm)
    assert t.bwd[2] == pytest.approx(4 / mm)


def test_simulate_rejects_mismatches():
    specs = chain_specs(4)
    s = build_schedule(specs, kind="gpipe", num_stages=2, num_microbatches=2)
    costs = uniform_chain_costs(4)
    with pytest.raises(ScheduleError, match="lowered with recompute='without_attention'"):
        simulate(s, specs, costs, device=unit_device(), seq_len=1, recompute="full")
    with pytest.raises(ScheduleError, match="do not match"):
        simulate(s, chain_specs(3), uniform_chain_costs(3), device=unit_device(), seq_len=1)
    with pytest.raises(ScheduleError, match="SegmentCosts"):
        simulate(s, specs, costs[:-1], device=unit_device(), seq_len=1)
