"""Big-model life cycle over gloo ranks: meta-built models materialized per rank and loaded
(parity with the single-process model in float64), strict loading by the user's names,
safetensors loading of owned tensors only, DCP checkpoints of model and optimizer that
reshard (pp=2 -> pp=4 -> one process), autocast parity, exact resume with dropout."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = [pytest.mark.multiprocess]

SEQ = 16
VOCAB = 256


def _build(arch: str, *, meta: bool = False, dtype=torch.float64, seed: int = 0, layers: int = 4):
    from helix_compiler.models import Llama, LlamaConfig, hf_model

    torch.manual_seed(seed)
    with torch.device("meta" if meta else "cpu"):
        m = Llama(LlamaConfig(num_layers=layers)) if arch == "llama" else hf_model("llama", num_layers=layers)
    return m.to(dtype)


def _batch(step: int, m: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (m, SEQ), generator=g), torch.randint(0, VOCAB, (m, SEQ), generator=g)


def _owned_names(pipe) -> set[str]:
    return {n for n, _ in pipe.named_parameters()} | {n for n, _ in pipe.named_buffers()}


def _never_allocated(pipe, model) -> list[str]:
    """Tensors of the model this rank does not own that hold storage (should be none)."""
    mine = _owned_names(pipe)
    bad = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in mine and not t.is_meta]
    for st in pipe.stages:  # other ranks' segment graphs too
        if st.rank == pipe.rank:
            continue
        for seg in st.segments.values():
            for n in seg.gm.graph.nodes:
                if n.op == "get_attr":
                    path, _, leaf = n.target.rpartition(".")
                    t = getattr(seg.gm.get_submodule(path) if path else seg.gm, leaf)
                    if isinstance(t, torch.Tensor) and not t.is_meta and not any(
                            t is o for o in pipe.state_dict(keep_vars=True).values()):
                        bad.append(f"{st.rank}:{n.target}")
    return bad


# ---------------------------------------------------------------------------- meta + load parity
def _meta_parity_worker(rank: int, cfg: dict) -> dict:
    from helix_compiler import HelixError, helix_compile, init_model
    from helix_compiler.capture.adapters import adapt_model

    arch, p = cfg["arch"], cfg["p"]
    M = 2 * p
    ref = _build(arch)
    model = _build(arch, meta=True)
    pipe = helix_compile(model, p, SEQ, num_microbatches=M, timeout=30, init_seed=7)
    assert not _never_allocated(pipe, model), _never_allocated(pipe, model)
    # the per-rank init equals init_model of the whole model (same per-module seeds)
    full = init_model(_build(arch, meta=True), seed=7, device="cpu")
    full_state = {**dict(full.named_parameters()), **dict(full.named_buffers())}
    for name, t in [*pipe.named_parameters(), *pipe.named_buffers()]:
        assert torch.equal(t, full_state[name]), f"rank {rank}: init of {name} differs from init_model"
    sd = ref.state_dict()
    mine = sorted(pipe.state_dict())
    with pytest.raises(HelixError, match=mine[0].replace(".", r"\.")):
        pipe.load_state_dict({k: v for k, v in sd.items() if k != mine[0]})
    with pytest.raises(HelixError, match=r"bogus\.weight"):
        pipe.load_state_dict({**sd, "bogus.weight": torch.zeros(1)})
    pipe.load_state_dict({k: sd[k] for k in mine})  # exactly this rank's entries
    # or the whole model's; assign=True puts these new tensors in: the graphs must follow
    pipe.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    pipe.to("cpu")
    assert all(p.is_leaf and p.requires_grad for p in pipe.parameters())
    ref_named = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    for name, t in [*pipe.named_parameters(), *pipe.named_buffers()]:
        assert torch.equal(t, ref_named[name]), f"rank {rank}: {name} not loaded"  # buffers: recomputed
    opt = torch.optim.SGD(pipe.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    ref_loss_fn = adapt_model(ref)
    losses = []
    for step in range(2):
        ids, labels = _batch(step, M)
        loss = pipe(ids, labels)
        loss.backward()
        ref_loss = torch.stack([ref_loss_fn(i[None], t[None]) for i, t in zip(ids, labels, strict=True)]).mean()
        ref_loss.backward()
        losses.append((float(loss.detach()), float(ref_loss.detach())))
        for name, prm in pipe.named_parameters():
            r = ref_named[name]
            assert torch.allclose(prm.grad, r.grad, rtol=1e-9, atol=1e-12), \
                f"rank {rank} step {step}: gradient of {name} differs by {float((prm.grad - r.grad).abs().max()):.3e}"
        opt.step(), ref_opt.step(), opt.zero_grad(), ref_opt.zero_grad()
    return {"losses": losses, "owned": mine}


@pytest.mark.parametrize("arch", ["llama", "hf_llama"])
def test_meta_model_init_load_and_gradient_parity(arch):
    from helix_compiler.runtime.launch import spawn_ranks

    results = spawn_ranks(_meta_parity_worker, 2, {"arch": arch, "p": 2}, timeout=240)
    # HF's own loss is float32 (logits.float()): the float64 run agrees to float32 rounding
    rel = 1e-6 if arch == "hf_llama" else 1e-9
    for r in results:
        for mine, ref in r["losses"]:
            assert mine == pytest.approx(ref, rel=rel)
    owned = [set(r["owned"]) for r in results]
    assert owned[0] and owned[1] and len(owned[0] & owned[1]) == 0


# ---------------------------------------------------------------------------- safetensors
def _spy_on_safetensors(safetensors) -> list[tuple[str, str]]:
    """Wrap ``safetensors.safe_open``; the returned list records ``(key, "whole" | "piece")``
    for every tensor read (``get_tensor`` / ``get_slice``)."""
    read: list[tuple[str, str]] = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            read.append((key, "whole"))
            return self.f.get_tensor(key)

        def get_slice(self, key):
            read.append((key, "piece"))
            return self.f.get_slice(key)

    safetensors.safe_open = Spy
    return read


def _safetensors_worker(rank: int, cfg: dict) -> dict:
    import safetensors

    from helix_compiler import helix_compile, load_pretrained

    read = _spy_on_safetensors(safetensors)
    model = _build("hf_llama", meta=True, dtype=torch.float32)
    pipe = helix_compile(model, 2, SEQ, num_microbatches=4, timeout=30)
    load_pretrained(pipe, cfg["path"])
    ref = _build("hf_llama", dtype=torch.float32)
    ref_named = dict(ref.named_parameters())
    for name, t in pipe.named_parameters():
        assert torch.equal(t, ref_named[name]), f"rank {rank}: {name} not loaded"
    return {"read": sorted(key for key, _ in read), "owned": sorted(pipe.state_dict())}


def test_load_pretrained_reads_only_owned_tensors_of_a_sharded_checkpoint(tmp_path):
    from helix_compiler.runtime.launch import spawn_ranks

    ref = _build("hf_llama", dtype=torch.float32)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    results = spawn_ranks(_safetensors_worker, 2, {"path": str(tmp_path)}, timeout=240)
    for r in results:
        assert r["read"] == r["owned"]  # nothing but this rank's tensors was read
    assert set(results[0]["read"]).isdisjoint(results[1]["read"])


# ---------------------------------------------------------------------------- DCP resharding
def _dcp_save_worker(rank: int, cfg: dict) -> dict:
    from helix_compiler import helix_compile
    from helix_compiler.checkpoint import save_checkpoint

    model = _build("llama", dtype=torch.float32)
    pipe = helix_compile(model, cfg["p"], SEQ, num_microbatches=2 * cfg["p"], timeout=30)
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(2):
        ids, labels = _batch(step, 2 * cfg["p"])
        pipe(ids, labels).backward()
        opt.step(), sched.step(), opt.zero_grad()
    save_checkpoint(cfg["path"], pipe, opt, scheduler=sched, step=2)
    return {"params": {n: p.detach().clone() for n, p in pipe.named_parameters()},
            "exp_avg": _optimizer_state(pipe, opt), "lr": opt.param_groups[0]["lr"]}


def _mesh(cfg: dict):
    from torch.distributed.device_mesh import init_device_mesh

    dims = tuple(d for d in ("pp", "dp", "tp") if d in cfg)
    return init_device_mesh("cpu", tuple(cfg[d] for d in dims), mesh_dim_names=dims) if len(dims) > 1 else None


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A dp_shard DTensor put back together (a collective over dp), else a copy."""
    return t.full_tensor().detach() if hasattr(t, "full_tensor") else t.detach().clone()


def _optimizer_state(pipe, opt) -> dict:
    by_param = {id(p): n for n, p in pipe.named_parameters()}
    state = {by_param[id(p)]: s["exp_avg"] for p, s in opt.state.items()}
    return {n: _whole(state[n]) for n, _ in pipe.named_parameters() if n in state}  # one order on every rank


def _dcp_load_worker(rank: int, cfg: dict) -> dict:
    """Load the pp=2 checkpoint into a meta-built model on another mesh; under tp also check
    the per-rank init, the loaded pieces' loss, loading by state dict and by safetensors (only
    this rank's pieces read), and save again (the pieces are put back together)."""
    from helix_compiler import helix_compile, init_model, load_pretrained
    from helix_compiler.checkpoint import load_checkpoint, save_checkpoint

    p = cfg["pp"]
    model = _build("llama", meta=True, dtype=torch.float32)
    pipe = helix_compile(model, p, SEQ, num_microbatches=2 * p, timeout=30, mesh=_mesh(cfg), init_seed=7,
                         dp_shard=cfg.get("dp_shard", False))
    st = pipe.stage
    out = {}
    if st.tp_size > 1:
        assert st.tp_shards and not _never_allocated(pipe, model), _never_allocated(pipe, model)
        full = init_model(_build("llama", meta=True, dtype=torch.float32), seed=7, device="cpu")
        for name, t in pipe.named_parameters():  # the per-rank init is init_model's slice
            whole = dict(full.named_parameters())[name]
            want = st.tp_shards[name].local(whole, st.tp_rank, st.tp_size) if name in st.tp_shards else whole
            assert torch.equal(t, want), f"rank {rank}: init of {name} is not init_model's piece"
        pipe.load_state_dict(cfg["saved"])  # whole tensors: each tp rank keeps its piece
        out["from_state_dict"] = {n: t.detach().clone() for n, t in pipe.named_parameters()}
        import safetensors
        real_open = safetensors.safe_open
        read = _spy_on_safetensors(safetensors)
        load_pretrained(pipe, cfg["safetensors"])
        safetensors.safe_open = real_open
        out["from_safetensors"] = {n: t.detach().clone() for n, t in pipe.named_parameters()}
        out["read"] = sorted(read)
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    step = load_checkpoint(cfg["path"], pipe, opt, scheduler=sched)
    out.update({"params": {n: _whole(p) for n, p in pipe.named_parameters()},
                "exp_avg": _optimizer_state(pipe, opt), "step": step, "lr": opt.param_groups[0]["lr"],
                "last_epoch": sched.last_epoch, "shards": dict(st.tp_shards), "tp_rank": st.tp_rank})
    save_checkpoint(cfg["path2"] if st.tp_size > 1 else cfg["path3"], pipe, opt, scheduler=sched, step=step)
    if st.tp_size > 1:
        with torch.no_grad():
            out["loss"] = float(pipe(*_batch(7, 2 * p)))
    return out


def _expect(r: dict, name: str, whole: torch.Tensor) -> torch.Tensor:
    shard = r["shards"].get(name)
    return whole if shard is None else shard.local(whole, r["tp_rank"], 2)


def test_dcp_checkpoint_reshards_over_pp_dp_tp_and_one_process(tmp_path):
    """pp=2 -> pp=4 x dp=2 with parameters sharded over dp (saved again) -> pp=2 x tp=2 (a
    meta model: per-rank init, state-dict and safetensors loading of the pieces; saved again)
    -> one process, from each of the three checkpoints."""
    import safetensors.torch
    import torch.distributed.checkpoint as dcp

    from helix_compiler.checkpoint import load_model_state
    from helix_compiler.runtime.launch import spawn_ranks

    path, path2, path3 = str(tmp_path / "ckpt"), str(tmp_path / "ckpt_tp"), str(tmp_path / "ckpt_dp_shard")
    saved = spawn_ranks(_dcp_save_worker, 2, {"p": 2, "path": path}, timeout=240)
    params = {k: v for r in saved for k, v in r["params"].items()}
    exp_avg = {k: v for r in saved for k, v in r["exp_avg"].items()}
    assert len(params) == len(dict(_build("llama").named_parameters()))
    base = _build("llama", dtype=torch.float32, seed=5)
    base_sd = {k: v.contiguous() for k, v in base.state_dict().items()}
    safetensors.torch.save_file(base_sd, str(tmp_path / "model.safetensors"))
    meshes = [{"pp": 4, "dp": 2, "dp_shard": True}, {"pp": 2, "tp": 2}]
    for mesh in meshes:
        cfg = {**mesh, "path": path, "path2": path2, "path3": path3, "saved": base_sd, "safetensors": str(tmp_path)}
        loaded = spawn_ranks(_dcp_load_worker, 8 if "dp" in mesh else 4, cfg, timeout=300)
        seen = set()
        for r in loaded:
            assert r["step"] == 2 and r["lr"] == saved[0]["lr"] and r["last_epoch"] == 2
            for name, value in r["params"].items():
                assert torch.equal(value, _expect(r, name, params[name])), f"{mesh}: {name} differs from the checkpoint"
                assert torch.equal(r["exp_avg"][name], _expect(r, name, exp_avg[name])), \
                    f"{mesh}: optimizer state of {name} differs"
                seen.add(name)
            if "tp" in mesh:
                assert r["shards"], "nothing split over tp"
                for name in r["params"]:
                    assert torch.equal(r["from_state_dict"][name], _expect(r, name, base_sd[name])), name
                    assert torch.equal(r["from_safetensors"][name], _expect(r, name, base_sd[name])), name
                assert {k for k, how in r["read"] if how == "whole"}.isdisjoint(r["shards"])
                assert {k for k, how in r["read"] if how == "piece"} == set(r["shards"])
        assert seen == set(params)
    # the tp=2 pipeline's loss on the checkpoint's weights is the single-process model's
    ref = _build("llama", dtype=torch.float32, seed=1)
    ref.load_state_dict(params, strict=False)
    from helix_compiler.capture.adapters import adapt_model

    ids, labels = _batch(7, 4)
    with torch.no_grad():
        want = torch.stack([adapt_model(ref)(i[None], t[None]) for i, t in zip(ids, labels, strict=True)]).mean()
    for r in loaded:
        assert r["loss"] == pytest.approx(float(want), rel=1e-5)
    for where in (path, path2, path3):  # the ones saved at tp=2 and with dp shards hold whole tensors again
        plain = _build("llama", dtype=torch.float32, seed=1)  # other values, overwritten by the load
        load_model_state(where, plain)
        for name, value in plain.named_parameters():
            assert torch.equal(value.detach(), params[name]), f"single process from {where}: {name} differs"
    for where in (path2, path3):
        optim = {f"state.{n}.exp_avg": torch.empty_like(v) for n, v in exp_avg.items()}
        dcp.load({"optim": optim}, checkpoint_id=where)
        for key, value in optim.items():
            assert torch.equal(value, exp_avg[key[len("state."):-len(".exp_avg")]]), f"{where}: {key}"


# ---------------------------------------------------------------------------- autocast
def _autocast_worker(rank: int, cfg: dict) -> dict:
    from helix_compiler import helix_compile
    from helix_compiler.capture.adapters import adapt_model

    model = _build(cfg["arch"], dtype=torch.float32)
    ref = copy.deepcopy(model)
    pipe = helix_compile(model, 2, SEQ, num_microbatches=4, timeout=30, recompute=cfg["recompute"])
    ref_fn = adapt_model(ref)
    ids, labels = _batch(0, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pipe(ids, labels)
    loss.backward()
    # the reference accumulates each micro batch's gradient in float32 .grad, as the pipeline does
    # (one backward over the mean would sum the micro batches' bf16 gradients in bf16 first)
    parts = []
    for i, t in zip(ids, labels, strict=True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            part = ref_fn(i[None], t[None])
        (part / len(ids)).backward()
        parts.append(part.detach())
    ref_loss = torch.stack(parts).mean()
    fp32_loss = torch.stack([ref_fn(i[None], t[None]) for i, t in zip(ids, labels, strict=True)]).mean()
    rp = dict(ref.named_parameters())
    errs = {n: float((p.grad - rp[n].grad).abs().max() / rp[n].grad.abs().max()) for n, p in pipe.named_parameters()}
    bf16_recv = sum(1 for specs in pipe.executor.recv_specs.values() for _, dt in specs if dt == torch.bfloat16)
    return {"loss": float(loss.detach()), "ref": float(ref_loss.detach()), "fp32": float(fp32_loss.detach()),
            "errs": errs, "bf16_recv": bf16_recv}


@pytest.mark.parametrize("arch,recompute", [("llama", "none"), ("llama", "without_attention"),
                                            ("hf_llama", "without_attention")])
def test_autocast_parity(arch, recompute):
    from helix_compiler.runtime.launch import spawn_ranks

    results = spawn_ranks(_autocast_worker, 2, {"arch": arch, "recompute": recompute}, timeout=240)
    for r in results:
        assert r["loss"] == pytest.approx(r["ref"], rel=1e-3)
        assert abs(r["ref"] - r["fp32"]) > 1e-5  # autocast changed the numbers: the test sees bf16
        worst = max(r["errs"].values())
        assert worst < 3e-2, f"gradient differs from autocast around the model by {worst:.3e} (relative)"
    assert sum(r["bf16_recv"] for r in results) > 0  # bf16 boundary tensors crossed ranks


# ---------------------------------------------------------------------------- exact resume
class _Block(nn.Module):
    def __init__(self, h: int, p: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, 4, h // 4).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.drop(self.proj(a))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class DropoutLM(nn.Module):
    def __init__(self, p: float = 0.1, layers: int = 4, h: int = 32):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, h)
        self.drop = nn.Dropout(p)
        self.blocks = nn.ModuleList(_Block(h, p) for _ in range(layers))
        self.lnf, self.head = nn.LayerNorm(h), nn.Linear(h, VOCAB, bias=False)

    def forward(self, input_ids, labels):
        x = self.drop(self.emb(input_ids))
        for b in self.blocks:
            x = b(x)
        return F.cross_entropy(self.head(self.lnf(x)).flatten(0, 1), labels.flatten())


def _resume_worker(rank: int, cfg: dict) -> dict:
    from helix_compiler import helix_compile
    from helix_compiler.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    with torch.device("meta" if cfg["resume"] else "cpu"):
        model = DropoutLM()
    pipe = helix_compile(model, 2, SEQ, num_microbatches=4, timeout=30)
    opt = torch.optim.AdamW(pipe.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    torch.manual_seed(1000 + rank)  # each rank's dropout stream
    start = load_checkpoint(cfg["path"], pipe, opt, scheduler=sched, restore_rng=cfg.get("rng", True)) \
        if cfg["resume"] else 0
    losses = {}
    for step in range(start, 6):
        ids, labels = _batch(step, 4)  # the data position is the step
        loss = pipe(ids, labels)
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        losses[step + 1] = float(loss.detach())
        if not cfg["resume"] and step + 1 == 3:
            save_checkpoint(cfg["path"], pipe, opt, scheduler=sched, step=3)
    return losses


def test_exact_resume_with_dropout(tmp_path):
    from helix_compiler.runtime.launch import spawn_ranks

    path = str(tmp_path / "step3")
    full = spawn_ranks(_resume_worker, 2, {"path": path, "resume": False}, timeout=240)
    resumed = spawn_ranks(_resume_worker, 2, {"path": path, "resume": True}, timeout=240)
    for a, b in zip(full, resumed, strict=True):
        assert sorted(b) == [4, 5, 6]
        assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]  # bitwise
    # dropout is on: a resume without the saved RNG states gives other losses
    no_rng = spawn_ranks(_resume_worker, 2, {"path": path, "resume": True, "rng": False}, timeout=240)
    assert [no_rng[0][s] for s in (4, 5, 6)] != [full[0][s] for s in (4, 5, 6)]
