"""Parameters and gradients sharded over dp (``helix_compile(..., dp_shard=True)``, pp=2 x dp=2,
4 gloo processes, float64): loss, every gradient (gathered whole from its DTensor shards), the
clipped global norm and the gathered state dict after two optimizer steps equal a
single-process model trained on the union of the replicas' batches; between steps each rank
keeps about 1/dp of its parameters; the option's misuses are rejected by name."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = [pytest.mark.multiprocess]

# the same models and batches as the replicated mode's tests (this folder is on sys.path, also
# in the spawned ranks)
from test_data_parallel import ATOL, RTOL, SEQ, _batch, _model  # noqa: E402


def _errors() -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from helix_compiler import HelixError, helix_compile

    seen = {}
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    for name, call in {"no dp": lambda: helix_compile(_model("llama"), 2, SEQ, dp_shard=True),
                       "dp of 1": lambda: helix_compile(_model("llama"), 2, SEQ, mesh=mesh, dp_shard=True)}.items():
        try:
            call()
            seen[name] = "no error"
        except HelixError as e:
            seen[name] = str(e)
    return seen


def _worker(rank: int, cfg: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from helix_compiler import HelixError, helix_compile, sharded_optimizer
    from helix_compiler.capture.adapters import adapt_model
    from helix_compiler.runtime.dp_shard import parameter_bytes

    out = _errors() if cfg.get("errors") else {}
    mesh = init_device_mesh("cpu", (cfg["dp"], cfg["pp"]), mesh_dim_names=("dp", "pp"))
    dp_rank = mesh["dp"].get_local_rank()
    model = _model(cfg["arch"])
    ref = copy.deepcopy(model)
    M = 2 * cfg["pp"]
    pipe = helix_compile(model, cfg["pp"], SEQ, num_microbatches=M, mesh=mesh, timeout=60, dp_shard=True)
    full_bytes = sum(p.numel() * p.element_size() for p in pipe.parameters())  # the DTensors' global size
    if cfg.get("errors"):
        try:
            sharded_optimizer(pipe, torch.optim.AdamW, lr=0.01)
            out["zero1"] = "no error"
        except HelixError as e:
            out["zero1"] = str(e)
    kind = torch.optim.AdamW if cfg["opt"] == "adamw" else torch.optim.SGD
    lr = 0.01 if cfg["opt"] == "adamw" else 0.05
    opt = kind(list(pipe.parameters()), lr=lr)
    ref_opt = kind(ref.parameters(), lr=lr)
    hf = cfg["arch"].startswith("hf_")
    fn = adapt_model(ref)
    ref_params = dict(ref.named_parameters())
    out.update(losses=[], norms=[], resident=[])
    calls = cfg.get("calls", 1)
    for step in range(2):
        for call in range(calls):
            ids, labels = _batch(cfg["dp"] * M, seed=100 * step + call)
            mine = slice(dp_rank * M, (dp_rank + 1) * M)
            loss = pipe(ids[mine], labels[mine])
            loss.backward()
            if hf:
                ref_loss = ref(input_ids=ids, labels=labels).loss
            else:
                ref_loss = torch.stack([fn(ids[m:m + 1], labels[m:m + 1]) for m in range(ids.shape[0])]).mean()
            ref_loss.backward()
            out["losses"].append((float(loss.detach()), float(ref_loss.detach())))
        norm = pipe.clip_grad_norm_(0.5)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        out["norms"].append((float(norm), float(ref_norm)))
        for name, p in pipe.named_parameters():
            assert isinstance(p, DTensor) and isinstance(p.grad, DTensor), (rank, name, type(p), type(p.grad))
            whole = p.grad.full_tensor()  # DTensor's own all-gather of the (uneven) shards
            r = ref_params[name]
            if not torch.allclose(whole, r.grad, rtol=RTOL, atol=ATOL):
                raise AssertionError(f"rank {rank} step {step}: gradient of {name} differs by "
                                     f"{float((whole - r.grad).abs().max()):.3e}")
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        out["resident"].append(parameter_bytes(pipe)["params"] / full_bytes)  # between steps
    if cfg.get("eval"):  # a forward-only call gathers and frees again
        with torch.no_grad():
            ids, labels = _batch(cfg["dp"] * M, seed=7)
            mine = slice(dp_rank * M, (dp_rank + 1) * M)
            out["eval"] = float(pipe(ids[mine], labels[mine]))
            out["ref_eval"] = float(torch.stack([fn(ids[m:m + 1], labels[m:m + 1]) for m in range(ids.shape[0])]).mean())
        out["resident"].append(parameter_bytes(pipe)["params"] / full_bytes)
    full = pipe.gather_state_dict()
    if full is not None:
        assert sorted(full) == sorted(ref_params)
        for name, value in full.items():
            assert not isinstance(value, DTensor), name
            assert torch.allclose(value, ref_params[name].detach(), rtol=RTOL, atol=ATOL), name
    if cfg.get("eval"):  # a whole model's plain state dict loads each rank's rows into its shards
        pipe.load_state_dict({k: v + 1 for k, v in ref.state_dict().items()})
        full = pipe.gather_state_dict()
        if full is not None:
            for name, value in full.items():
                assert torch.allclose(value, ref_params[name].detach() + 1, rtol=RTOL, atol=ATOL), name
    out["graph_bytes"] = sum(p.untyped_storage().nbytes() for p in pipe.stage.params.values())
    out["owned"] = sorted(n for n, _ in pipe.named_parameters())
    out["all"] = sorted(ref_params)
    return out


CASES = {
    # SGD, gradient accumulation over 2 calls, an evaluation call, the option's errors
    "llama-sgd-accumulate": ("llama", {"opt": "sgd", "calls": 2, "eval": True, "errors": True}),
    # tied embedding/head on two pipeline ranks, token-mean loss, AdamW state as DTensor shards
    "hf_gpt2-tied-adamw": ("hf_gpt2", {"opt": "adamw"}),
}


@pytest.mark.parametrize("arch,extra", CASES.values(), ids=CASES.keys())
def test_pp2_dp2_sharded_parity(arch, extra):
    from helix_compiler.runtime.launch import spawn_ranks

    cfg = dict(arch=arch, pp=2, dp=2, **extra)
    results = spawn_ranks(_worker, 4, cfg, timeout=300)
    rel = 1e-6 if arch.startswith("hf_") else RTOL  # HF computes its loss in float32
    for r in results:
        for got, want in r["losses"]:
            assert got == pytest.approx(want, rel=rel, abs=ATOL)
        for got, want in r["norms"]:
            assert got == pytest.approx(want, rel=1e-9)
        for share in r["resident"]:  # about 1/dp of the rank's parameters between steps
            assert 0.4 < share < 0.6, r["resident"]
        assert r["graph_bytes"] == 0  # the full parameters are freed between steps
        if extra.get("eval"):
            assert r["eval"] == pytest.approx(r["ref_eval"], rel=RTOL)
        if extra.get("errors"):
            assert "dp_shard=True" in r["no dp"] and "dp" in r["no dp"] and "dp_shard=False" in r["no dp"]
            assert "dp_shard=True" in r["dp of 1"] and "('pp', 'tp') have no dp" in r["dp of 1"]
            assert "dp_shard=True" in r["zero1"] and "already sharded" in r["zero1"]
    assert set().union(*(r["owned"] for r in results)) == set(results[0]["all"])
    assert len({r["losses"][0] for r in results}) == 1
