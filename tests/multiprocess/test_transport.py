"""Transport and spawn_ranks over gloo on CPU, in spawned processes (2 and 4 ranks).

Each spawn costs a few seconds of start-up (torch import per rank on 2 cores), so every
test runs many checks inside one spawn and returns what it saw; the parent asserts."""

from __future__ import annotations

import time

import pytest
import torch

from helix_compiler.errors import HelixError, RuntimeFailure
from helix_compiler.runtime.fingerprint import agree
from helix_compiler.runtime.launch import RankFailed, _primary_failure, spawn_ranks
from helix_compiler.runtime.transport import Transport
from helix_compiler.runtime.wire import build_header as _build_header
from helix_compiler.runtime.wire import nbytes as _nbytes
from helix_compiler.runtime.wire import packed_layout as _packed_layout
from helix_compiler.runtime.wire import parse_header as _parse_header

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]

# (check, pack): every transport configuration the positive tests run through
CONFIGS = [("header", False), ("header", True), ("off", False), ("off", True)]


def _payload(i: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return [
        torch.randn(3, 5, generator=g, dtype=torch.float32),
        torch.randn(7, generator=g, dtype=torch.float64),
        torch.randint(-2**40, 2**40, (2, 2), generator=g, dtype=torch.int64),
    ]


def _specs(ts: list[torch.Tensor]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape), t.dtype) for t in ts]


def _two_rank_checks(rank: int) -> dict:
    """Runs on 2 ranks; returns per-config observations from rank 1's point of view (and the
    exchange result on both)."""
    peer = 1 - rank
    seen: dict = {}
    for check, pack in CONFIGS:
        key = f"{check}/pack={pack}"
        t = Transport(check=check, pack=pack, timeout=15)
        obs: dict = {}

        # 1. FIFO per pair: 6 messages over two folds, waited in reverse order
        n = 6
        if rank == 0:
            for i in range(n):
                t.send(_payload(i), peer, fold=i % 2, tag=f"fifo{i}")
        else:
            handles = [t.recv(_specs(_payload(i)), peer, fold=i % 2, tag=f"fifo{i}")
                       for i in range(n)]
            got = [h.wait() for h in reversed(handles)][::-1]
            obs["fifo"] = all(
                all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(g, _payload(i), strict=True))
                for i, g in enumerate(got))
        t.drain()

        # 2. folds: the fold-1 message is sent first, rank 1 waits fold 0 first
        if rank == 0:
            t.send([torch.full((4,), 11.0)], peer, fold=1, tag="f1")
            t.send([torch.full((4,), 10.0)], peer, fold=0, tag="f0")
        else:
            h1 = t.recv([((4,), torch.float32)], peer, fold=1, tag="f1")
            h0 = t.recv([((4,), torch.float32)], peer, fold=0, tag="f0")
            t.wait_fold(0)
            obs["fold0_done_first"] = h0.done and not h1.done
            obs["fold0"] = h0.wait()[0].tolist()
            obs["pending_fold1"] = t.pending(1)
            t.wait_fold(1)
            obs["fold1"] = h1.wait()[0].tolist()
        t.drain()

        # 3. waiting fold 0 never waits on fold 1: the fold-1 message is only sent after
        #    rank 1 has answered fold 0, so any coupling deadlocks (and times out)
        if rank == 0:
            t.send([torch.tensor([1.0, 2.0])], peer, fold=0, tag="a")
            ack = t.recv([((1,), torch.int64)], peer, fold=0, tag="ack")
            t.wait_fold(0)
            t.send([torch.tensor([3.0])], peer, fold=1, tag="b")
            obs["ack"] = ack.wait()[0].item()
        else:
            h0 = t.recv([((2,), torch.float32)], peer, fold=0, tag="a")
            h1 = t.recv([((1,), torch.float32)], peer, fold=1, tag="b")
            t.wait_fold(0)
            t.send([torch.tensor([7])], peer, fold=0, tag="ack")
            obs["independent"] = (h0.wait()[0].tolist(), h1.wait()[0].tolist())
        t.drain()

        # 4. pairwise round trips (both ranks post the receive, then send), over both folds
        outs = []
        for i in range(4):
            mine = torch.full((2, 3), float(10 * rank + i))
            h = t.recv([((2, 3), torch.float32)], peer, fold=i % 2, tag=f"x{i}")
            t.send([mine], peer, fold=i % 2, tag=f"x{i}")
            outs.append(h)
        obs["exchange"] = [h.wait()[0][0, 0].item() for h in outs]
        if rank == 0:
            t.send([torch.ones(1)], peer, fold=0, tag="edge")
        else:
            obs["edge"] = t.recv([((1,), torch.float32)], peer, fold=0,
                                 tag="edge").wait()[0].item()
        t.drain()

        # 5. odd tensors: bf16, bool, 0-d, empty, non-contiguous; bitwise equal
        g = torch.Generator().manual_seed(7)
        base = torch.randn(4, 6, generator=g, dtype=torch.float64)
        odd = [base.t(), base.to(torch.bfloat16), base > 0, torch.tensor(3.5),
               torch.empty(0, 5), torch.arange(6, dtype=torch.int32)[::2]]
        if rank == 0:
            t.send(odd, peer, fold=0, tag="odd")
        else:
            got = t.recv([(tuple(x.shape), x.dtype) for x in odd], peer, fold=0,
                         tag="odd").wait()
            obs["odd"] = all(torch.equal(a, b) and a.dtype == b.dtype and a.shape == b.shape
                             for a, b in zip(got, odd, strict=True))
        t.drain()
        obs["pending_after_drain"] = t.pending()
        obs["stats"] = (t.stats.sent_messages, t.stats.recv_messages)
        seen[key] = obs
    return seen


def test_two_ranks_fifo_folds_round_trips_dtypes():
    results = spawn_ranks(_two_rank_checks, 2, timeout=150)
    for key, obs in results[1].items():
        assert obs["fifo"], key
        assert obs["fold0_done_first"], key
        assert obs["fold0"] == [10.0] * 4 and obs["fold1"] == [11.0] * 4, key
        assert obs["pending_fold1"] == 1, key
        assert obs["independent"] == ([1.0, 2.0], [3.0]), key
        assert obs["exchange"] == [0.0, 1.0, 2.0, 3.0], key  # rank 0's values
        assert obs["edge"] == 1.0, key
        assert obs["odd"], key
        assert obs["pending_after_drain"] == 0, key
    for key, obs in results[0].items():
        assert obs["exchange"] == [10.0, 11.0, 12.0, 13.0], key
        assert obs["ack"] == 7, key
        assert obs["pending_after_drain"] == 0, key
        assert obs["stats"][0] > 0 and obs["stats"][1] > 0, key


def _four_rank_checks(rank: int) -> dict:
    """All pairs at once: every rank sends 3 messages (alternating folds) to every other rank
    before receiving anything, then pairwise exchanges with r^1 and r^2, then a fold-0 wait
    that must not depend on fold-1 traffic from a different peer."""
    t = Transport(timeout=20)
    world = 4
    out: dict = {}
    def val(src: int, dst: int, k: int) -> torch.Tensor:
        return torch.full((5,), float(100 * src + 10 * dst + k), dtype=torch.float64)
    handles = {}
    for k in range(3):
        for dst in range(world):
            if dst != rank:
                t.send([val(rank, dst, k), torch.tensor([k])], dst, fold=k % 2, tag=f"p{k}")
    for k in range(3):
        for src in range(world):
            if src != rank:
                handles[(src, k)] = t.recv([((5,), torch.float64), ((1,), torch.int64)], src,
                                           fold=k % 2, tag=f"p{k}")
    t.wait_fold(1)
    t.wait_fold(0)
    out["all_pairs"] = all(
        torch.equal(h.wait()[0], val(src, rank, k)) and h.wait()[1].item() == k
        for (src, k), h in handles.items())
    ex = []
    for i, mask in enumerate((1, 2, 3)):
        peer = rank ^ mask
        ex.append(t.recv([((1,), torch.float32)], peer, fold=i % 2, tag=f"ex{mask}"))
        t.send([torch.tensor([float(rank)])], peer, fold=i % 2, tag=f"ex{mask}")
    out["exchange"] = [h.wait()[0].item() for h in ex]
    t.drain()
    # fold separation across peers: rank 0 waits fold 0 from rank 1 while fold 1 from rank 2
    # is only sent once rank 0 has answered (over rank 1 -> rank 2)
    if rank == 0:
        h2 = t.recv([((1,), torch.float32)], 2, fold=1, tag="late")
        h1 = t.recv([((1,), torch.float32)], 1, fold=0, tag="early")
        t.wait_fold(0)
        t.send([torch.tensor([1.0])], 1, fold=0, tag="go")
        out["cross"] = (h1.wait()[0].item(), h2.wait()[0].item())
    elif rank == 1:
        t.send([torch.tensor([5.0])], 0, fold=0, tag="early")
        t.recv([((1,), torch.float32)], 0, fold=0, tag="go").wait()
        t.send([torch.tensor([1.0])], 2, fold=0, tag="go")
    elif rank == 2:
        t.recv([((1,), torch.float32)], 1, fold=0, tag="go").wait()
        t.send([torch.tensor([6.0])], 0, fold=1, tag="late")
    t.drain()
    return out


def test_four_ranks_all_pairs_and_round_trips():
    results = spawn_ranks(_four_rank_checks, 4, timeout=150)
    for rank, out in enumerate(results):
        assert out["all_pairs"], rank
        assert out["exchange"] == [float(rank ^ m) for m in (1, 2, 3)], rank
    assert results[0]["cross"] == (5.0, 6.0)


def _mismatch_checks(rank: int) -> dict:
    """Rank 0 sends, rank 1 posts a receive that does not match; rank 1 reports messages."""
    cases = [
        # (sent tensors, posted specs, posted fold, posted tag, receiver mode)
        ([torch.zeros(4, 8)], [((8, 4), torch.float32)], 0, "seg3 mb1", "header"),
        ([torch.zeros(4, dtype=torch.int64)], [((4,), torch.float64)], 0, "dt", "header"),
        ([torch.zeros(2, 3)], [((4, 3), torch.float32)], 0, "small", "header"),
        ([torch.zeros(3)], [((3,), torch.float32)], 0, "expected-tag", "header"),
        ([torch.zeros(3)], [((3,), torch.float32)], 1, "fold", "header"),
    ]
    sent_tags = ["seg3 mb1", "dt", "small", "sent-tag", "fold"]
    sender = Transport(check="header", timeout=10)
    out = []
    for (sent, specs, fold, tag, mode), sent_tag in zip(cases, sent_tags, strict=True):
        if rank == 0:
            sender.send(sent, 1, fold=0, tag=sent_tag)
        else:
            t = Transport(check=mode, timeout=10)  # a failed transport stays failed: fresh one
            h = t.recv(specs, 0, fold=fold, tag=tag)
            try:
                h.wait()
                out.append(None)
            except RuntimeFailure as e:
                try:  # the failed transport refuses further use
                    t.recv(specs, 0, fold=fold, tag=tag)
                    again = None
                except RuntimeFailure as e2:
                    again = str(e2)
                out.append((str(e), e.rank, e.peer, e.fold, again))
    return out


def test_mismatch_names_expected_and_actual():
    results = spawn_ranks(_mismatch_checks, 2, timeout=120)
    out = results[1]
    assert all(o is not None for o in out), out
    same_size, dtype, small, tag, fold = out
    msg = same_size[0]
    assert "rank 1" in msg and "rank 0" in msg and "seg3 mb1" in msg
    assert "(8, 4) float32" in msg and "(4, 8) float32" in msg
    assert same_size[1:4] == (1, 0, 0)
    assert "unusable" in same_size[4]
    assert "(4,) float64" in dtype[0] and "(4,) int64" in dtype[0]
    assert "(4, 3) float32" in small[0] and "(2, 3) float32" in small[0]
    assert "'expected-tag'" in tag[0] and "'sent-tag'" in tag[0]
    assert "fold 1" in fold[0] and "fold 0" in fold[0]


def _raise_or_wait(rank: int, timeout: float) -> None:
    """Rank 1 raises. Rank 0 waits on rank 1; ranks 2 and 3 wait on rank 0: they must fail
    through the cascade, long before the transport timeout."""
    t = Transport(timeout=timeout)
    if rank == 1:
        time.sleep(0.5)
        raise ValueError("boom from rank 1")
    src = 1 if rank == 0 else 0
    t0 = time.monotonic()
    try:
        t.recv([((8,), torch.float32)], src, fold=rank % 2, tag=f"act r{rank}").wait()
    except RuntimeFailure as e:
        e.elapsed = time.monotonic() - t0  # travels with the pickled exception
        raise


def test_raising_rank_fails_the_others_fast():
    timeout = 8.0
    t0 = time.monotonic()
    results = spawn_ranks(_raise_or_wait, 4, timeout, timeout=120, return_exceptions=True)
    total = time.monotonic() - t0
    assert all(isinstance(r, RankFailed) for r in results), results
    assert results[1].exc_type == "ValueError" and isinstance(results[1].original, ValueError)
    for rank in (0, 2, 3):
        r = results[rank]
        assert r.exc_type == "RuntimeFailure", (rank, str(r))
        e = r.original
        assert isinstance(e, RuntimeFailure)
        assert e.elapsed < timeout, (rank, e.elapsed)  # cascade, not timeout
        assert e.rank == rank and e.peer == (1 if rank == 0 else 0) and e.fold == rank % 2
        msg = str(e)
        assert f"rank {e.peer} closed its connection" in msg, msg
        assert f"act r{rank}" in msg and "(8,) float32" in msg
        assert "rank 1: ValueError: boom from rank 1" in msg, msg  # the root cause, reported
    assert total < 60


def _hang(rank: int) -> None:
    t = Transport(timeout=2.0)
    if rank == 1:
        time.sleep(60)  # alive but never sends
        return
    t0 = time.monotonic()
    try:
        t.recv([((3, 3), torch.float64)], 1, fold=1, tag="F2 mb5 layer2").wait()
    except RuntimeFailure as e:
        e.elapsed = time.monotonic() - t0
        raise


def test_hung_peer_times_out_and_spawn_reraises_with_rank():
    t0 = time.monotonic()
    with pytest.raises(RankFailed) as info:
        spawn_ranks(_hang, 2, timeout=120, grace=1.0)
    total = time.monotonic() - t0
    err = info.value
    assert err.rank == 0 and err.exc_type == "RuntimeFailure"
    assert "_hang" in err.child_traceback  # the child's own traceback
    e = err.original
    assert isinstance(e, RuntimeFailure) and isinstance(err.__cause__, RuntimeFailure)
    assert 1.9 < e.elapsed < 2.0 + 1.5, e.elapsed
    assert (e.rank, e.peer, e.fold) == (0, 1, 1)
    msg = str(err)
    assert "timed out" in msg and "F2 mb5 layer2" in msg and "(3, 3) float64" in msg
    assert "rank 1: killed" in msg  # the hung rank was killed after the grace period
    assert total < 60


# ---------------------------------------------------------------------- no processes


def test_header_round_trip_and_layout():
    specs = [((2, 3), torch.float32), ((), torch.int64), ((0, 4), torch.bfloat16)]
    words = _build_header(specs, 1, "F1 mb3 layer2")
    h = _parse_header(words)
    assert h.valid and not h.truncated and h.fold == 1 and h.tag == "F1 mb3 layer2"
    assert h.specs == [((2, 3), "float32"), ((), "int64"), ((0, 4), "bfloat16")]
    assert h.nbytes == 24 + 8
    many = [((1, 2, 3, 4, 5, 6), torch.float32)] * 10  # more than the header can describe
    assert _parse_header(_build_header(many, 0, "")).truncated
    offsets, total = _packed_layout(specs, True)
    assert all(o % 64 == 0 for o in offsets) and total >= 512 + 32
    assert _nbytes((3, 4), torch.float16) == 24


def test_primary_failure_prefers_root_cause():
    fails = {0: RankFailed("rank 0 failed", rank=0, exc_type="RuntimeFailure",
                           child_message="rank 0: waiting ..."),
             2: RankFailed("rank 2 of 3 failed with KeyError: 'x'", rank=2, exc_type="KeyError",
                           child_message="'x'", child_traceback="Traceback ...")}
    err = _primary_failure(fails, [0, 2], 3, 1.0)
    assert err.rank == 2 and "KeyError" in str(err) and "rank 1: finished" in str(err)
    assert "rank 0: RuntimeFailure" in str(err)


def _sleep_forever(rank: int) -> None:
    time.sleep(600)


def test_spawn_ranks_overall_timeout_never_hangs():
    t0 = time.monotonic()
    with pytest.raises(RankFailed, match="did not finish within the 3 s timeout") as info:
        spawn_ranks(_sleep_forever, 1, timeout=3)
    assert info.value.rank == 0 and info.value.exc_type == "timeout"
    assert time.monotonic() - t0 < 3 + 8


def _ping(rank: int) -> list[float]:
    t = Transport(timeout=20)
    h = t.recv([((1,), torch.float32)], 1 - rank, fold=0)
    t.send([torch.tensor([float(rank)])], 1 - rank, fold=0)
    out = h.wait()[0].tolist()
    t.drain()
    return out


def test_spawn_start_method_also_works():
    # the default start method is forkserver (fast); plain spawn must work the same way
    assert spawn_ranks(_ping, 2, timeout=150, start_method="spawn") == [[1.0], [0.0]]


def _oversize(rank: int) -> None:
    t = Transport(check="off", timeout=10)
    if rank == 0:
        t.send([torch.zeros(64)], 1, fold=0)
        t.drain()
    else:
        t.recv([((8,), torch.float32)], 0, fold=0).wait()


def test_message_larger_than_posted_buffer_is_reported_not_hung():
    # gloo aborts the receiving process (C++ terminate) when a message is larger than the
    # posted buffer; spawn_ranks must report that rank, and the sender must not hang
    t0 = time.monotonic()
    with pytest.raises(RankFailed) as info:
        spawn_ranks(_oversize, 2, timeout=120, grace=1.0)
    err = info.value
    assert err.rank == 1, str(err)
    assert err.exc_type in ("died", "RuntimeFailure"), str(err)
    if err.exc_type == "died":
        assert "SIGABRT" in str(err) or "exit code" in str(err)
    assert time.monotonic() - t0 < 60


# ---------------------------------------------------------------------- send completion


def _release_checks(rank: int) -> dict:
    """A send completes once the peer has posted its receive; inflight_send_bytes() counts it
    until then. The completion thread only marks it done: the calling thread drops the last
    reference in release_sent() (the executor calls it at the end of every instruction), so the free
    happens on the thread that allocated, where the profiler sees it."""
    import weakref

    t = Transport(timeout=15)
    out: dict = {}
    if rank == 0:
        x = torch.ones(1 << 18)  # 1 MB
        ref = weakref.ref(x)
        h = t.send([x], 1, fold=0, tag="fwd A1 m0")
        del x
        out["inflight_before"] = t.inflight_send_bytes()
        out["done_before"] = h.done()  # rank 1 posts its receive only after 0.5 s
        ack = t.recv([((1,), torch.int64)], 1, fold=1, tag="ack")
        ack.wait()
        deadline = time.monotonic() + 2.0
        while not h.done() and time.monotonic() < deadline:
            time.sleep(0.005)
        out["done_after"] = h.done()
        out["inflight_after"] = t.inflight_send_bytes()
        out["held_after_completion"] = ref() is not None
        out["released_count"] = t.release_sent()
        out["released"] = ref() is None
        out["pending_fold0"] = t.pending(0)
        h.wait(timeout=1.0)  # idempotent once done
    else:
        time.sleep(0.5)
        got = t.recv([((1 << 18,), torch.float32)], 0, fold=0, tag="fwd A1 m0").wait()
        out["sum"] = float(got[0].sum())
        t.send([torch.tensor([1])], 0, fold=1, tag="ack")
    t.drain()
    return out


def test_sent_buffers_are_released_on_the_calling_thread_once_the_send_completes():
    r0, r1 = spawn_ranks(_release_checks, 2, timeout=60)
    assert r1["sum"] == float(1 << 18)
    assert r0["inflight_before"] == 4 << 18 and r0["done_before"] is False, r0
    assert r0["done_after"] and r0["inflight_after"] == 0 and r0["pending_fold0"] == 0, r0
    assert r0["held_after_completion"] and r0["released_count"] == 1 and r0["released"], r0


def _send_to_dead_peer(rank: int) -> dict:
    t = Transport(timeout=10)
    if rank == 1:
        time.sleep(0.5)
        import os

        os._exit(3)  # never posts the receive
    h = t.send([torch.zeros(1 << 16)], 1, fold=1, tag="fwd A3 m5")
    time.sleep(2.0)  # the completion thread sees the peer go away meanwhile
    out = {"done": h.done()}
    try:
        t.recv([((1,), torch.float32)], 1, fold=0, tag="next")  # the next transport call
        out["error"] = None
    except RuntimeFailure as e:
        out["error"] = (str(e), e.rank, e.peer, e.fold)
    return out


def test_a_failed_send_is_raised_at_the_next_call_naming_the_send():
    r0, r1 = spawn_ranks(_send_to_dead_peer, 2, timeout=60, return_exceptions=True)
    assert isinstance(r1, RankFailed) and r1.exc_type == "died"
    assert r0["done"] is False and r0["error"] is not None, r0
    msg, rank, peer, fold = r0["error"]
    assert (rank, peer, fold) == (0, 1, 1), r0
    assert "send of 1 tensor [(65536,) float32] to rank 1" in msg and "fwd A3 m5" in msg, msg
    assert "rank 1 closed its connection" in msg, msg


def _delayed_fold1(rank: int) -> dict:
    """Rank 0 sends fold 0's message, sleeps 1.5 s, then sends fold 1's. Rank 1's fold-0
    waits must return without waiting for fold 1 (neither its receive nor its own fold-1
    send, which rank 0 only receives after the sleep)."""
    t = Transport(timeout=15)
    out: dict = {}
    if rank == 0:
        t.send([torch.full((8,), 0.0)], 1, fold=0, tag="fwd A1 m0")
        time.sleep(1.5)
        t.send([torch.full((8,), 1.0)], 1, fold=1, tag="fwd A1 m1")
        out["back"] = t.recv([((4,), torch.float32)], 1, fold=1, tag="bwd A1 m1").wait()[0].tolist()
    else:
        t0 = time.monotonic()
        h0 = t.recv([((8,), torch.float32)], 0, fold=0, tag="fwd A1 m0")
        h1 = t.recv([((8,), torch.float32)], 0, fold=1, tag="fwd A1 m1")
        s1 = t.send([torch.full((4,), 2.0)], 0, fold=1, tag="bwd A1 m1")
        out["h0"] = h0.wait()[0].tolist()
        out["h0_s"] = time.monotonic() - t0
        t.wait_fold(0)
        out["fold0_s"] = time.monotonic() - t0
        out["h1_pending"] = not h1.done and not s1.done()
        out["pending1"] = t.pending(1)
        out["h1"] = h1.wait()[0].tolist()
        out["h1_s"] = time.monotonic() - t0
        s1.wait()
    t.drain()
    return out


def test_fold_waits_never_wait_for_a_delayed_fold():
    r0, r1 = spawn_ranks(_delayed_fold1, 2, timeout=60)
    assert r1["h0"] == [0.0] * 8 and r1["h1"] == [1.0] * 8 and r0["back"] == [2.0] * 4
    assert r1["h0_s"] < 1.0 and r1["fold0_s"] < 1.0, r1
    assert r1["h1_pending"] and r1["pending1"] == 2, r1
    assert r1["h1_s"] >= 1.4, r1


# ---------------------------------------------------------------------- collectives


def _collective_never_joined(rank: int, timeout: float) -> dict:
    """Rank 2 creates the groups, then never joins any collective. The process group was
    created with a 30-minute timeout: each collective must fail after the transport's."""
    import torch.distributed as dist

    from helix_compiler.runtime.groups import store_of

    gs = [dist.new_group([0, 1, 2]) for _ in range(6)]
    store = store_of()
    if rank == 2:  # alive, never joins; leaves when the others are done
        store.wait(["never_joined/0", "never_joined/1"], __import__("datetime").timedelta(seconds=60))
        return {}
    calls = [
        ("broadcast", lambda t: t.broadcast_(torch.zeros(3), src=2, what="loss broadcast")),
        ("all_reduce", lambda t: t.all_reduce_(torch.zeros(3))),
        ("all_gather", lambda t: t.all_gather_(torch.zeros(3))),
        ("gather", lambda t: t.gather_objects({"a": 1}, dst=0)),
        ("barrier", lambda t: t.barrier()),
        ("agree", lambda t: agree(t, (1, 2), what="program fingerprint", fix="")),
    ]
    out: dict = {}
    for g, (name, call) in zip(gs, calls, strict=True):
        t = Transport(group=g, timeout=timeout)
        t0 = time.monotonic()
        try:
            call(t)
            out[name] = None
        except RuntimeFailure as e:
            out[name] = (time.monotonic() - t0, str(e), e.rank)
    store.set(f"never_joined/{rank}", "1")
    return out


def test_every_collective_is_bounded_by_the_transport_timeout():
    timeout = 1.0
    results = spawn_ranks(_collective_never_joined, 3, timeout, timeout=120,
                          comm_timeout=1800.0, grace=0.5, return_exceptions=True)
    for rank in (0, 1):
        out = results[rank]
        assert isinstance(out, dict), str(out)
        for name, seen in out.items():
            assert seen is not None, (rank, name)
            elapsed, msg, r = seen
            assert elapsed < timeout + 2.0, (rank, name, elapsed)
            assert r == rank and f"rank {rank}" in msg and "timed out" in msg, msg
            assert f"transport timeout {timeout:g} s" in msg, msg
        assert "broadcast from rank 2 (loss broadcast)" in out["broadcast"][1]
        assert "all_reduce" in out["all_reduce"][1] and "all_gather" in out["all_gather"][1]
        assert "barrier" in out["barrier"][1] and "program fingerprint" in out["agree"][1]


def _subgroups(rank: int) -> dict:
    """4 ranks in two groups of 2 ({0, 1} and {2, 3}): a Transport on each speaks group
    ranks, for messages and collectives alike."""
    import torch.distributed as dist

    ga, gb = dist.new_group([0, 1]), dist.new_group([2, 3])
    t = Transport(group=ga if rank < 2 else gb, timeout=15)
    me, peer = t.rank, 1 - t.rank
    out: dict = {"group_rank": me, "world": t.world_size}
    h = t.recv([((2,), torch.float32)], peer, fold=0, tag="x")
    t.send([torch.tensor([float(rank), float(me)])], peer, fold=0, tag="x")
    out["p2p"] = h.wait()[0].tolist()
    out["bcast"] = t.broadcast_(torch.tensor([float(rank)]), src=0).item()
    out["sum"] = t.all_reduce_(torch.tensor([float(rank)])).item()
    out["max"] = t.all_reduce_(torch.tensor([float(rank)]), "max").item()
    out["gathered"] = [x.item() for x in t.all_gather_(torch.tensor([rank]))]
    out["objects"] = t.gather_objects({"rank": rank}, dst=1)
    agree(t, (7, 2**63 - 1, -3), what="same everywhere", fix="")
    try:
        agree(t, (1, rank), what="batch hash", fix="pass every rank the same batch")
        out["disagree"] = None
    except HelixError as e:
        out["disagree"] = str(e)
    t.drain()
    return out


def test_transport_over_subgroups_uses_group_ranks():
    results = spawn_ranks(_subgroups, 4, timeout=90)
    for rank, out in enumerate(results):
        base = 0 if rank < 2 else 2
        other = base + (1 - (rank - base))
        assert out["group_rank"] == rank - base and out["world"] == 2
        assert out["p2p"] == [float(other), float(1 - (rank - base))]
        assert out["bcast"] == float(base)  # group rank 0 of each group
        assert out["sum"] == float(2 * base + 1) and out["max"] == float(base + 1)
        assert out["gathered"] == [base, base + 1]
        if rank - base == 1:
            assert out["objects"] == [{"rank": base}, {"rank": base + 1}]
        else:
            assert out["objects"] is None
        msg = out["disagree"]
        assert msg is not None and "disagree on batch hash" in msg and "pass every rank the same batch" in msg, msg
        assert f"rank 0: (1, {base})" in msg and f"rank 1: (1, {base + 1})" in msg, msg


# ---------------------------------------------------------------------- failure reports


def _serve_store(port_conn) -> None:
    from helix_compiler.runtime.groups import host_store

    store = host_store("127.0.0.1", timeout_s=60)
    port_conn.send(store.port)
    time.sleep(60)


def test_failure_reports_are_bounded_when_the_store_host_is_stopped():
    """The store's host (rank 0 in a launch without torchrun's agent) is stopped: reading or
    writing failure reports must give up within about a second, not the store's timeout."""
    import multiprocessing as mp
    import os
    import signal

    from helix_compiler.runtime import failures
    from helix_compiler.runtime.groups import connect_store

    ctx = mp.get_context("fork")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_serve_store, args=(b,), daemon=True)
    p.start()
    try:
        port = a.recv()
        store = connect_store("127.0.0.1", port, timeout_s=30)
        failures.report_failure("rank 1: ValueError: first", store=store)
        assert failures.reported_failures(store=store) == ["rank 1: ValueError: first"]
        os.kill(p.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        failures.report_failure("rank 2: RuntimeFailure: second", store=store)
        assert failures.reported_failures(store=store) == []
        text = failures.reports_text(store)
        elapsed = time.monotonic() - t0
        assert "no failure reports available (store unreachable)" in text
        assert elapsed < 2 * failures.STORE_BOUND_S + 0.5, elapsed
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(5)
