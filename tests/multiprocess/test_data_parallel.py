"""Pipeline x data parallelism on one DeviceMesh (pp=2 x dp=2, 4 gloo processes): loss, every
gradient, the clipped global gradient norm and the gathered state dict after two optimizer
steps equal a single-process model trained on the union of the replicas' batches (float64)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = [pytest.mark.multiprocess]

SEQ = 32
RTOL, ATOL = 1e-9, 1e-12


def _model(arch: str):
    from helix_compiler.models import Llama, LlamaConfig, hf_model

    torch.manual_seed(0)
    m = Llama(LlamaConfig(num_layers=4)) if arch == "llama" else hf_model(arch.removeprefix("hf_"), num_layers=4)
    return m.to(torch.float64)


def _batch(rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (rows, SEQ), generator=g)
    labels = torch.randint(0, 256, (rows, SEQ), generator=g)
    for r in range(rows):  # uneven counted tokens per micro batch
        labels[r, torch.randperm(SEQ, generator=g)[:int(torch.randint(0, SEQ // 2, (), generator=g))]] = -100
    return ids, labels


def _worker(rank: int, cfg: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from helix_compiler import helix_compile
    from helix_compiler.capture.adapters import adapt_model

    mesh = init_device_mesh("cpu", tuple(cfg[d] for d in cfg["dims"]), mesh_dim_names=cfg["dims"])
    dp_rank = mesh["dp"].get_local_rank()
    model = _model(cfg["arch"])
    ref = copy.deepcopy(model)
    M = 2 * cfg["pp"]
    pipe = helix_compile(model, cfg["pp"], SEQ, num_microbatches=M, mesh=mesh, timeout=60,
                         schedule=cfg.get("schedule", "helix"), num_folds=2 if cfg.get("schedule", "helix") == "helix" else 1)
    if cfg.get("zero"):  # Adam state sharded over dp (ZeRO-1)
        from helix_compiler import sharded_optimizer

        opt = sharded_optimizer(pipe, torch.optim.AdamW, lr=0.01)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01)
    else:
        opt = torch.optim.SGD(list(pipe.parameters()), lr=0.05)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    hf = cfg["arch"].startswith("hf_")
    fn = adapt_model(ref)
    ref_params = dict(ref.named_parameters())
    out = {"losses": [], "norms": []}
    calls = cfg.get("calls", 1)  # gradient accumulation: several calls per optimizer step
    for step in range(2):
        for call in range(calls):
            ids, labels = _batch(cfg["dp"] * M, seed=100 * step + call)
            mine = slice(dp_rank * M, (dp_rank + 1) * M)
            loss = pipe(ids[mine], labels[mine])
            loss.backward()  # gradients of the calls add up (1F1B's backward runs inside pipe())
            if hf:  # the model's own loss on the union batch: the token mean
                ref_loss = ref(input_ids=ids, labels=labels).loss
            else:  # the mean of every micro batch's loss, over all replicas
                ref_loss = torch.stack([fn(ids[m:m + 1], labels[m:m + 1]) for m in range(ids.shape[0])]).mean()
            ref_loss.backward()
            out["losses"].append((float(loss.detach()), float(ref_loss.detach())))
        norm = pipe.clip_grad_norm_(cfg.get("max_norm", 0.5))
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.get("max_norm", 0.5))
        out["norms"].append((float(norm), float(ref_norm)))
        for name, p in pipe.named_parameters():
            r = ref_params[name]
            assert p.grad is not None, f"rank {rank}: no gradient for {name}"
            if not torch.allclose(p.grad, r.grad, rtol=RTOL, atol=ATOL):
                raise AssertionError(f"rank {rank} step {step}: gradient of {name} differs by "
                                     f"{float((p.grad - r.grad).abs().max()):.3e}")
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    full = pipe.gather_state_dict()
    if full is not None:
        assert sorted(full) == sorted(ref_params)
        for name, value in full.items():
            assert torch.allclose(value, ref_params[name].detach(), rtol=RTOL, atol=ATOL), name
    if cfg.get("zero"):
        from helix_compiler.runtime.zero import optimizer_state_bytes

        mine = optimizer_state_bytes(opt)
        whole = sum(2 * p.numel() * p.element_size() for p in pipe.parameters())  # Adam's two moments
        out["state_share"] = mine / whole
    out["owned"] = sorted(n for n, _ in pipe.named_parameters())
    out["all"] = sorted(ref_params)
    return out


CASES = {
    "llama-helix": ("llama", ("dp", "pp"), {}),  # GQA, mean of micro-batch means over the whole mesh
    "hf_gpt2-tied-tokens": ("hf_gpt2", ("pp", "dp"), {}),  # tied embedding/head on two pipeline ranks
    "llama-1f1b-accumulate": ("llama", ("dp", "pp"), {"calls": 2, "schedule": "1f1b"}),
    "llama-zero1-adamw": ("llama", ("dp", "pp"), {"zero": True}),  # optimizer state sharded over dp
}


@pytest.mark.parametrize("arch,dims,extra", CASES.values(), ids=CASES.keys())
def test_pp2_dp2_parity(arch, dims, extra):
    from helix_compiler.runtime.launch import spawn_ranks

    cfg = dict(arch=arch, pp=2, dp=2, dims=dims, **extra)
    results = spawn_ranks(_worker, 4, cfg, timeout=300)
    rel = 1e-6 if arch.startswith("hf_") else RTOL  # HF computes its loss in float32
    for r in results:
        for got, want in r["losses"]:
            assert got == pytest.approx(want, rel=rel, abs=ATOL)
        for got, want in r["norms"]:
            assert got == pytest.approx(want, rel=1e-9)
    assert set().union(*(r["owned"] for r in results)) == set(results[0]["all"])
    assert len({r["losses"][0] for r in results}) == 1  # every rank of the mesh returns the same loss
    if extra.get("zero"):  # each dp rank keeps about half of its pipeline rank's Adam state
        for r in results:
            assert 0.2 < r["state_share"] < 0.8, r["state_share"]


def _checks_worker(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from helix_compiler import HelixError, helix_compile
    from helix_compiler.models import GPT, GPTConfig

    seen = {}
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    for name, call in {
        "pp size": lambda: helix_compile(_model("llama"), 4, SEQ, mesh=mesh),
        "not a mesh": lambda: helix_compile(_model("llama"), 2, SEQ, mesh="pp2"),
        "tp": lambda: helix_compile(_model("llama"), 2, SEQ, mlp_chunks=2,
                                    mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))),
    }.items():
        try:
            call()
            seen[name] = "no error"
        except HelixError as e:
            seen[name] = str(e)
    # pipeline only (the whole world, 4 stages), tied weights on two ranks: the global norm
    torch.manual_seed(0)
    model = GPT(GPTConfig(num_layers=4, max_seq_len=64)).double()
    ref = copy.deepcopy(model)
    pipe = helix_compile(model, 4, SEQ, num_microbatches=4, schedule="1f1b", head_stage=None, timeout=60)
    ids, labels = _batch(4, seed=5)
    loss = pipe(ids, labels)
    try:
        (loss / 2).backward()
        seen["scaled"] = "no error"
    except HelixError as e:
        seen["scaled"] = str(e)
    torch.stack([ref(ids[m:m + 1], labels[m:m + 1]) for m in range(4)]).mean().backward()
    for norm_type in (2.0, float("inf")):
        seen[f"norm {norm_type}"] = (float(pipe.clip_grad_norm_(1e9, norm_type)),
                                     float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9, norm_type)))
    return seen


def test_mesh_errors_scaled_loss_under_1f1b_and_the_global_norm_without_dp():
    from helix_compiler.runtime.launch import spawn_ranks

    for r in spawn_ranks(_checks_worker, 4, timeout=240):
        assert "pp_size=4 but mesh['pp'] has 2 ranks" in r["pp size"]
        assert "must be a torch.distributed.device_mesh.DeviceMesh" in r["not a mesh"]
        assert "mlp_chunks=2 with tensor_parallel=2" in r["tp"]
        assert "gradient 0.5" in r["scaled"] and "schedule='1f1b'" in r["scaled"]
        for norm_type in (2.0, float("inf")):
            got, want = r[f"norm {norm_type}"]
            assert got == pytest.approx(want, rel=1e-9)


def _death_worker(rank: int) -> dict:
    import time

    from torch.distributed.device_mesh import init_device_mesh

    from helix_compiler import helix_compile
    from helix_compiler.errors import RuntimeFailure

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    pipe = helix_compile(_model("llama"), 2, SEQ, num_microbatches=4, mesh=mesh, timeout=3.0)
    ids, labels = _batch(4, seed=mesh["dp"].get_local_rank())
    pipe(ids, labels).backward()  # one good step
    torch.distributed.barrier()  # every rank is done with it: none waits on the dying rank's last messages
    if rank == 3:  # the second replica's last stage dies before step 2
        os._exit(0)
    t0 = time.monotonic()
    try:
        pipe(ids, labels).backward()
        return {"error": None}
    except RuntimeFailure as e:
        return {"error": str(e), "after": time.monotonic() - t0}


def test_a_dying_dp_rank_ends_every_rank_with_a_named_error_in_time():
    from helix_compiler.runtime.launch import RankFailed, spawn_ranks

    results = spawn_ranks(_death_worker, 4, timeout=120, return_exceptions=True)
    assert isinstance(results[3], RankFailed) or results[3] is None  # the dead rank reports nothing
    for rank in (0, 1, 2):
        r = results[rank]
        assert isinstance(r, dict) and r["error"], (rank, r)
        assert f"global rank {rank}" in r["error"] and r["after"] < 3.0 + 3.0, (rank, r)
