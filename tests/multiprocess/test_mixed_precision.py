"""bf16 parameters with fp32 master weights over gloo ranks: a tiny Llama compiled in bf16
trains two steps on pp=2 with ``master_weight_optimizer(AdamW)`` like the single-process bf16
model with the same optimizer on the union batch, and its checkpoint (DCP) carries the
masters; a rank whose parameters left their compiled dtype (``pipe.to``) makes every rank
raise an error naming the dtypes, fast, before any message."""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = [pytest.mark.multiprocess]

SEQ, VOCAB, M = 16, 256, 4
LR, WD = 1e-3, 0.01


def _build(dtype: torch.dtype, layers: int = 4):
    from helix_compiler.models import Llama, LlamaConfig

    torch.manual_seed(0)
    return Llama(LlamaConfig(num_layers=layers)).to(dtype)


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (M, SEQ), generator=g), torch.randint(0, VOCAB, (M, SEQ), generator=g)


# ---------------------------------------------------------------------------- bf16 + fp32 masters
def _bf16_worker(rank: int, cfg: dict) -> dict:
    from helix_compiler import helix_compile, master_weight_optimizer
    from helix_compiler.checkpoint import load_checkpoint, save_checkpoint

    pipe = helix_compile(_build(torch.bfloat16), 2, SEQ, num_microbatches=M, timeout=30)
    opt = master_weight_optimizer(pipe, torch.optim.AdamW, lr=LR, weight_decay=WD)
    losses = []
    for step in range(2):
        loss = pipe(*_batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    names = {p: n for n, p in pipe.named_parameters()}
    out = {"losses": losses,
           "masters": {names[p]: m.clone() for p, m in opt.masters.items()},
           "params": {n: p.detach().clone() for n, p in pipe.named_parameters()},
           "exp_avg": {names[p]: s["exp_avg"].clone() for p, s in opt.state.items()},
           "recv_dtypes": sorted({str(dt) for specs in pipe.executor.recv_specs.values() for _, dt in specs})}
    # the masters go through helix_compiler.checkpoint (DCP): a fresh optimizer over changed
    # parameters gets them all back
    save_checkpoint(cfg["path"], pipe, opt, step=2)
    with torch.no_grad():
        for p in pipe.parameters():
            p.add_(1.0)
    opt2 = master_weight_optimizer(pipe, torch.optim.AdamW, lr=1.0)
    out["step"] = load_checkpoint(cfg["path"], pipe, opt2)
    out["restored"] = {names[p]: (torch.equal(m, out["masters"][names[p]]), torch.equal(p.detach(), out["params"][names[p]]),
                                  torch.equal(opt2.state[p]["exp_avg"], out["exp_avg"][names[p]]))
                       for p, m in opt2.masters.items()}
    out["lr"] = opt2.param_groups[0]["lr"]
    return out


def test_bf16_pipeline_with_fp32_masters_matches_the_model(tmp_path):
    from helix_compiler import master_weight_optimizer
    from helix_compiler.runtime.launch import spawn_ranks

    results = spawn_ranks(_bf16_worker, 2, {"path": str(tmp_path / "ckpt")}, timeout=300)
    # the single-process model in bf16, the same optimizer, the union batch
    ref = _build(torch.bfloat16)
    start = {n: p.detach().float() for n, p in ref.named_parameters()}
    opt = master_weight_optimizer(ref, torch.optim.AdamW, lr=LR, weight_decay=WD)
    ref_losses = []
    for step in range(2):
        loss = ref(*_batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_losses.append(float(loss.detach()))
    masters = {n: opt.masters[p] for n, p in ref.named_parameters()}
    with torch.no_grad():
        fp32_loss = float(_build(torch.float32)(*_batch(0)))

    seen = set()
    for r in results:
        # bf16 keeps 8 significant bits (spacing 2^-8 = 3.9e-3 relative): the pipeline rounds
        # each micro batch's loss to bf16 on the head, the model the union batch's once
        assert r["losses"] == pytest.approx(ref_losses, rel=8e-3, abs=0)
        assert r["losses"][0] != fp32_loss  # bf16 did run: not the fp32 model's loss
        assert "torch.bfloat16" in r["recv_dtypes"]  # bf16 boundary tensors crossed the ranks
        diff = steps = 0.0
        for name, m in r["masters"].items():
            want = masters[name]
            assert m.dtype == torch.float32 and r["params"][name].dtype == torch.bfloat16
            assert torch.equal(r["params"][name], m.to(torch.bfloat16)), f"{name}: parameter is not its master rounded"
            # Adam's first steps are about lr * sign(gradient), and the pipeline sums the micro
            # batches' bf16 gradients (each rounded) where the model rounds the union batch's
            # once: an element whose gradient lies within that rounding of zero can step up to
            # 2 lr the other way. Measured: <= 1.6 % of a tensor's elements (one of a norm's
            # 64), 7.8 % of the steps' norm; a wrong gradient (another batch): 60-86 %, 141 %
            apart = int(((m - want).abs() > LR / 2).sum())
            assert apart <= max(2, 0.02 * m.numel()), f"{name}: {apart} of {m.numel()} master weights differ"
            assert float((m - want).abs().max()) <= 4 * LR * (1 + 1e-3)  # two steps, each at most 2 lr apart
            diff += float(((m - start[name]) - (want - start[name])).norm() ** 2)
            steps += float((want - start[name]).norm() ** 2)
            seen.add(name)
        assert (diff / steps) ** 0.5 < 0.15, f"the steps differ from the model's by {(diff / steps) ** 0.5:.3f}"
        assert r["step"] == 2 and r["lr"] == LR
        assert all(all(ok) for ok in r["restored"].values()), {n: ok for n, ok in r["restored"].items() if not all(ok)}
    assert seen == set(masters)


# ---------------------------------------------------------------------------- dtype disagreement
def _dtype_worker(rank: int, cfg: dict) -> dict:
    from helix_compiler import HelixError, helix_compile

    pipe = helix_compile(_build(torch.float32, layers=2), 2, SEQ, num_microbatches=M, timeout=30)
    out = {}

    def step(case: str) -> None:
        t0 = time.monotonic()
        try:
            loss = pipe(*_batch(0))
            loss.backward()
            out[case] = ("ok", float(loss), time.monotonic() - t0)
        except HelixError as e:
            out[case] = ("HelixError", str(e), time.monotonic() - t0)

    if rank == 0:
        pipe.to(torch.bfloat16)
    step("one_rank_cast")  # rank 0 bf16, rank 1 fp32
    pipe.to(torch.bfloat16)
    step("all_cast")  # every rank bf16, the program fp32
    pipe.to(torch.float32)
    step("back")  # the compiled dtype again: the pipeline runs
    return out


def test_a_rank_whose_parameter_dtype_differs_raises_named_error():
    from helix_compiler.runtime.launch import spawn_ranks

    results = spawn_ranks(_dtype_worker, 2, {}, timeout=240)
    for rank, r in enumerate(results):
        kind, msg, seconds = r["one_rank_cast"]
        assert kind == "HelixError", msg
        assert f"rank {rank}: the ranks disagree on the dtype of the parameters" in msg, msg
        assert "rank 0: bfloat16" in msg and "rank 1: float32 (as compiled)" in msg, msg
        assert seconds < 10, f"took {seconds:.1f} s (the helix timeout is 30 s)"  # raised, not waited out
        kind, msg, seconds = r["all_cast"]
        assert kind == "HelixError" and "are bfloat16, but the program was compiled with float32" in msg, msg
        assert "cast the model before helix_compile" in msg and seconds < 10, msg
        kind, loss, _ = r["back"]
        assert kind == "ok" and loss == results[0]["back"][1] and 4.0 < loss < 7.0, (kind, loss)
