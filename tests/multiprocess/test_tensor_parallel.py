"""Tensor parallelism inside the stages on one DeviceMesh (pp=2 x tp=2, 4 gloo processes;
pp=2 x tp=2 x dp=2, 8): loss, every rank's gradient shard, the clipped global gradient norm
and the gathered state dict after two optimizer steps equal a single-process model (float64)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = [pytest.mark.multiprocess]

SEQ = 32
RTOL, ATOL = 1e-9, 1e-12


def _model(arch: str, layers: int):
    from helix_compiler.models import Llama, LlamaConfig, hf_model

    torch.manual_seed(0)
    if arch == "llama":  # GQA: 4 query heads, 2 K/V heads
        m = Llama(LlamaConfig(num_layers=layers, heads=4, kv_heads=2, hidden=64))
    else:
        m = hf_model(arch.removeprefix("hf_"), num_layers=layers, hidden=64, heads=4, kv_heads=2)
    return m.to(torch.float64)


def _batch(rows: int, seed: int, seq: int = SEQ):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (rows, seq), generator=g)
    labels = torch.randint(0, 256, (rows, seq), generator=g)
    for r in range(rows):  # uneven counted tokens per micro batch
        labels[r, torch.randperm(seq, generator=g)[:int(torch.randint(0, seq // 2, (), generator=g))]] = -100
    return ids, labels


def _worker(rank: int, cfg: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from helix_compiler import helix_compile
    from helix_compiler.capture.adapters import adapt_model

    dims = cfg["dims"]
    mesh = init_device_mesh("cpu", tuple(cfg[d] for d in dims), mesh_dim_names=dims)
    dp, dp_rank = (mesh["dp"].size(), mesh["dp"].get_local_rank()) if "dp" in dims else (1, 0)
    model = _model(cfg["arch"], cfg["layers"])
    ref = copy.deepcopy(model)
    M = 2 * cfg["pp"]
    seq = cfg.get("seq", SEQ)
    pipe = helix_compile(model, cfg["pp"], seq, num_microbatches=M, mesh=mesh, timeout=60,
                         schedule=cfg.get("schedule", "helix"),
                         num_folds=2 if cfg.get("schedule", "helix") == "helix" else 1,
                         sequence_parallel=cfg.get("sp"), dp_shard=cfg.get("dp_shard", False))
    st = pipe.stage
    assert st.tp_size == cfg["tp"] and st.tp_shards, "no parameter is split over tp"
    code = "\n".join(seg.gm.code for seg in st.segments.values())
    opt = torch.optim.SGD(list(pipe.parameters()), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    hf = cfg["arch"].startswith("hf_")
    # a Hugging Face model's own loss upcasts the logits to float32, where the vocabulary-parallel
    # cross-entropy sums in another order than torch's: float32-accurate gradients there
    rtol, atol = (1e-5, 1e-7) if hf else (RTOL, ATOL)
    fn = adapt_model(ref)
    ref_params = dict(ref.named_parameters())
    out = {"losses": [], "norms": [], "collectives": sum(code.count(f"{op}(") for op in
                                                         ("tp_copy", "tp_reduce", "sp_all_gather", "sp_reduce_scatter")),
           "sequence_parallel": "sp_reduce_scatter(" in code,
           "shipped": sum(len(c.shipped_params) for c in pipe.program.cuts)}
    for step in range(2):
        for call in range(cfg.get("calls", 1)):  # gradient accumulation: several calls per optimizer step
            ids, labels = _batch(dp * M, seed=100 * step + call, seq=seq)
            mine = slice(dp_rank * M, (dp_rank + 1) * M)
            loss = pipe(ids[mine], labels[mine])
            loss.backward()
            if hf:  # the model's own loss on the union batch: the token mean
                ref_loss = ref(input_ids=ids, labels=labels).loss
            else:  # the mean of every micro batch's loss, over all replicas
                ref_loss = torch.stack([fn(ids[m:m + 1], labels[m:m + 1]) for m in range(ids.shape[0])]).mean()
            ref_loss.backward()
            out["losses"].append((float(loss.detach()), float(ref_loss.detach())))
        norm = pipe.clip_grad_norm_(0.5)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        out["norms"].append((float(norm), float(ref_norm)))
        for name, p in pipe.named_parameters():
            want = ref_params[name].grad
            sh = st.tp_shards.get(name)
            if sh is not None:
                want = sh.local(want, st.tp_rank, st.tp_size)
            assert p.grad is not None and p.grad.shape == want.shape, (rank, name)
            got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # dp_shard: over dp
            if not torch.allclose(got, want, rtol=rtol, atol=atol):
                raise AssertionError(f"rank {rank} step {step}: gradient of {name} differs by "
                                     f"{float((got - want).abs().max()):.3e}")
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    full = pipe.gather_state_dict()
    out["gathered"] = full is not None
    if full is not None:
        assert sorted(full) == sorted(ref_params)
        for name, value in full.items():
            assert torch.allclose(value, ref_params[name].detach(), rtol=rtol, atol=atol), name
        out["full"] = full if cfg.get("ckpt") else None
    if cfg.get("ckpt"):  # a DCP checkpoint of the pieces and shards: saved whole, loaded back
        from helix_compiler.checkpoint import load_checkpoint, save_checkpoint

        def mine(t):
            return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()

        before = {n: mine(p) for n, p in pipe.named_parameters()}
        save_checkpoint(cfg["ckpt"], pipe, opt)
        with torch.no_grad():
            for p in pipe.parameters():
                p.zero_()
        load_checkpoint(cfg["ckpt"], pipe, opt)
        for n, p in pipe.named_parameters():
            assert torch.equal(mine(p), before[n]), f"rank {rank}: {n} not restored from the checkpoint"
    out["owned"] = sorted(n for n, _ in pipe.named_parameters())
    out["all"] = sorted(ref_params)
    return out


CASES = {
    # two calls per optimizer step: the norm weights' partial gradients are summed over tp per call
    "llama-gqa-accumulate-pp2-tp2": ("llama", dict(pp=2, tp=2, dims=("pp", "tp"), layers=4, calls=2)),
    "hf_gpt2-fused-qkv-tied-pp2-tp2": ("hf_gpt2", dict(pp=2, tp=2, dims=("tp", "pp"), layers=4)),
    "hf_llama-1f1b-pp2-tp2": ("hf_llama", dict(pp=2, tp=2, dims=("pp", "tp"), layers=2, schedule="1f1b")),
    "hf_qwen2-no-sp-pp2-tp2": ("hf_qwen2", dict(pp=2, tp=2, dims=("pp", "tp"), layers=2, sp=False)),
    # at 256 tokens the cut ships each layer's LN1 output (a sequence part under SP) and W_qkv
    # shards to the attention stage, which gathers the sequence before the QKV GEMM
    "llama-shipped-weights-pp2-tp2": ("llama", dict(pp=2, tp=2, dims=("pp", "tp"), layers=2, seq=256)),
    "llama-pp2-tp2-dp2": ("llama", dict(pp=2, tp=2, dp=2, dims=("dp", "pp", "tp"), layers=2)),
    # parameters and gradients sharded over dp too: dp shards of each tp rank's pieces
    "llama-pp2-tp2-dp2-dp_shard-accumulate": ("llama", dict(pp=2, tp=2, dp=2, dims=("pp", "dp", "tp"), layers=2,
                                                           dp_shard=True, calls=2)),
}


@pytest.mark.parametrize("arch,cfg", CASES.values(), ids=CASES.keys())
def test_tensor_parallel_parity(arch, cfg, tmp_path):
    from helix_compiler.runtime.launch import spawn_ranks

    world = cfg["pp"] * cfg["tp"] * cfg.get("dp", 1)
    ckpt = {"ckpt": str(tmp_path / "ckpt")} if cfg.get("dp_shard") else {}
    results = spawn_ranks(_worker, world, dict(arch=arch, **cfg, **ckpt), timeout=600)
    rel = 1e-6 if arch.startswith("hf_") else RTOL  # HF computes its loss in float32
    for r in results:
        for got, want in r["losses"]:
            assert got == pytest.approx(want, rel=rel, abs=ATOL)
        for got, want in r["norms"]:
            assert got == pytest.approx(want, rel=rel)
        assert r["collectives"] > 0 and r["sequence_parallel"] == cfg.get("sp", True)
        assert (r["shipped"] > 0) == ("seq" in cfg)
    assert set().union(*(r["owned"] for r in results)) == set(results[0]["all"])
    assert sum(r["gathered"] for r in results) == cfg.get("dp", 1)  # pipeline rank 0, tp rank 0 of each replica
    assert len({r["losses"][0] for r in results}) == 1  # every rank of the mesh returns the same loss
    if ckpt:  # the checkpoint holds the whole model: it loads into the plain model in one process
        from helix_compiler.checkpoint import load_model_state

        full = next(r["full"] for r in results if r.get("full"))
        plain = _model(arch, cfg["layers"])
        load_model_state(ckpt["ckpt"], plain)
        for name, value in plain.named_parameters():
            assert torch.equal(value.detach(), full[name]), f"single process: {name} differs"


def _death_worker(rank: int) -> dict:
    import time

    from torch.distributed.device_mesh import init_device_mesh

    from helix_compiler import helix_compile
    from helix_compiler.errors import RuntimeFailure

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    pipe = helix_compile(_model("llama", 2), 2, SEQ, num_microbatches=4, mesh=mesh, timeout=3.0)
    ids, labels = _batch(4, seed=0)
    pipe(ids, labels).backward()  # one good step
    torch.distributed.barrier()  # every rank is done with it: none waits on the dying rank's last messages
    if rank == 3:  # the last stage's second tp rank dies before step 2
        os._exit(0)
    t0 = time.monotonic()
    try:
        pipe(ids, labels).backward()
        return {"error": None}
    except RuntimeFailure as e:
        return {"error": str(e), "after": time.monotonic() - t0}


def test_a_dying_tp_rank_ends_every_rank_with_a_named_error_in_time():
    from helix_compiler.runtime.launch import RankFailed, spawn_ranks

    results = spawn_ranks(_death_worker, 4, timeout=120, return_exceptions=True)
    assert isinstance(results[3], RankFailed) or results[3] is None  # the dead rank reports nothing
    for rank in (0, 1, 2):
        r = results[rank]
        assert isinstance(r, dict) and r["error"], (rank, r)
        assert f"global rank {rank}" in r["error"] and r["after"] < 3.0 + 3.0, (rank, r)
