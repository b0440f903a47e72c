"""Failure behaviour of the runtime: no hangs, errors that name where and what."""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = [pytest.mark.multiprocess]

SEQ, M = 32, 4


def _pipe(timeout: float):
    from helix_compiler import helix_compile
    from helix_compiler.models import Llama, LlamaConfig

    torch.manual_seed(0)
    return helix_compile(Llama(LlamaConfig(num_layers=2)), 2, SEQ, num_microbatches=M, num_folds=2, timeout=timeout)


def _batch(seq: int = SEQ):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (M, seq), generator=g), torch.randint(0, 256, (M, seq), generator=g)


def _dies_mid_step(rank: int) -> str:
    pipe = _pipe(timeout=3.0)
    if rank == 1:
        forward = pipe.executor.dispatch["F"]
        calls = []

        def broken(instr):
            calls.append(instr)
            if len(calls) == 2:
                raise RuntimeError("injected failure")
            forward(instr)

        pipe.executor.dispatch["F"] = broken
    t0 = time.monotonic()
    try:
        loss = pipe(*_batch())
        loss.backward()
    except Exception as e:  # noqa: BLE001 - the test inspects what every rank saw
        return f"{type(e).__name__} after {time.monotonic() - t0:.1f}s: {e}"
    return "no error"


def test_a_failing_rank_stops_every_rank_within_the_timeout():
    from helix_compiler.runtime.launch import spawn_ranks

    t0 = time.monotonic()
    results = spawn_ranks(_dies_mid_step, 2, timeout=120, return_exceptions=True)
    elapsed = time.monotonic() - t0
    texts = [str(r) for r in results]
    assert "injected failure" in texts[1] and "rank 1" in texts[1], texts[1]
    assert "segment" in texts[1] and "micro batch" in texts[1], texts[1]
    assert texts[0].startswith("RuntimeFailure"), texts[0]
    seconds = float(texts[0].split(" after ")[1].split("s:")[0])
    assert seconds < 3.0 + 5.0, texts[0]  # the configured timeout plus slack, never a hang
    assert elapsed < 100


def _wrong_batch(rank: int) -> str:
    from helix_compiler.errors import HelixError

    pipe = _pipe(timeout=5.0)
    sent_before = pipe.transport.stats.sent_messages
    try:
        pipe(*_batch(seq=SEQ + 1))
    except HelixError as e:
        assert pipe.transport.stats.sent_messages == sent_before  # rejected before any communication
        return str(e)
    return "no error"


def test_a_batch_of_the_wrong_shape_is_rejected_before_communication():
    from helix_compiler.runtime.launch import spawn_ranks

    for text in spawn_ranks(_wrong_batch, 2, timeout=120):
        assert "input_ids has shape (4, 33)" in text and "(4, 32)" in text and "recompile" in text, text


def _boundary_mismatch(rank: int) -> str:
    pipe = _pipe(timeout=5.0)
    if rank == 1:  # make rank 1 expect a wrong shape for what rank 0 sends it
        prog = pipe.executor.program
        first_recv = next(i for i in prog.instrs if i.op == "RECV")
        key = (first_recv.value, first_recv.seg)
        (shape, dtype), *rest = prog.recv_specs[key]
        wrong = (((shape[0], shape[1] + 1, *shape[2:]), dtype), *rest)
        object.__setattr__(prog, "recv_specs", {**prog.recv_specs, key: wrong})  # frozen dataclass
    try:
        loss = pipe(*_batch())
        loss.backward()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_a_shape_mismatch_at_a_boundary_names_segment_micro_batch_rank_and_shapes():
    from helix_compiler.runtime.launch import spawn_ranks

    results = [str(r) for r in spawn_ranks(_boundary_mismatch, 2, timeout=120, return_exceptions=True)]
    text = results[1]
    assert "rank 1" in text and "micro batch 0" in text and "segment" in text, text
    assert "(1, 33," in text and "(1, 32," in text, text  # expected and actual shapes


def _campaign():
    import importlib.util
    import sys
    from pathlib import Path

    if "helix_fault_campaign" not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "benchmarks" / "fault_campaign.py"
        spec = importlib.util.spec_from_file_location("helix_fault_campaign", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["helix_fault_campaign"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["helix_fault_campaign"]


def _campaign_worker(rank: int, trial: dict) -> None:  # importable by the spawned ranks
    _campaign().worker(rank, trial)


@pytest.mark.timeout(120)
def test_fault_injection_survivors_raise_named_runtime_failures_in_time():
    """Two injections of benchmarks/fault_campaign.py (a SIGKILL in the forward half, a SIGSTOP
    in the backward half) on a running 2-rank pipeline: the survivor raises a RuntimeFailure
    naming its rank within the timeout + 2 s, and what it was waiting for: the instruction and
    micro batch ("named"); when the victim stopped after its last message to the survivor, the
    message's tag at the step's end drain ("tagged") or the bounded collective of the next step
    that the victim never joined ("collective"): the outcomes the campaign counts as named."""
    fc = _campaign()
    for victim, sig, phase in ((1, "SIGKILL", "forward"), (0, "SIGSTOP", "backward")):
        trial = {"launch": "spawn", "world": 2, "victim": victim, "signal": sig, "phase": phase,
                 "seed": 7, "timeout": 2.0, "layers": 2, "seq": 32}
        row = fc.run_in_process(trial, _campaign_worker, grace=6.0)
        ((rank, (kind, dt, msg)),) = row["outcomes"].items()
        assert row["injected_in"] is not None, row
        assert kind in ("named", "tagged", "collective"), row
        assert dt < 2.0 + 2.0, row
        assert f"rank {rank}" in msg, row
