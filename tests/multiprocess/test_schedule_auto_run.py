"""The program schedule="auto" chooses runs: 2 CPU ranks (gloo), float64 loss and every
parameter gradient equal to the single-process model over two optimizer steps."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.multiprocess]

SEQ = 64
SEQUENCES = 4  # per step: the search may split them into M micro batches of b sequences


def _worker(rank: int, tune: dict) -> dict:
    from helix_compiler import helix_compile
    from helix_compiler.models import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig(num_layers=4)).to(torch.float64)
    ref = copy.deepcopy(model)
    pipe = helix_compile(model, 2, SEQ, schedule="auto", num_microbatches=SEQUENCES, tune=tune, timeout=30)
    choice = pipe.program.choice
    opt = torch.optim.SGD(list(pipe.parameters()), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    ref_params = dict(ref.named_parameters())
    losses, worst = [], 0.0
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 256, (SEQUENCES, SEQ), generator=g)
        labels = torch.randint(0, 256, (SEQUENCES, SEQ), generator=g)
        loss = pipe(ids, labels)
        loss.backward()
        ref_loss = ref(ids, labels)  # token mean over the whole batch = mean of equal micro batch means
        ref_loss.backward()
        losses.append((float(loss.detach()), float(ref_loss.detach())))
        for name, p in pipe.named_parameters():
            assert p.grad is not None, f"rank {rank}: no gradient for {name}"
            worst = max(worst, float((p.grad - ref_params[name].grad).abs().max()))
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    c = choice.chosen.candidate
    return {"label": c.label(), "schedule": pipe.program.config.schedule, "M": c.num_microbatches,
            "b": c.micro_batch_size, "losses": losses, "worst": worst,
            "owned": sorted(n for n, _ in pipe.named_parameters()), "all": sorted(ref_params)}


@pytest.mark.parametrize("tune", [
    {},  # everything: the tiny model is latency-bound, few large micro batches win
    {"schedules": ("helix",), "num_microbatches": (4,), "recompute": ("without_attention", "full")},
], ids=["all-kinds", "helix-only"])
def test_auto_choice_runs_with_gradient_parity(tune):
    from helix_compiler.runtime.launch import spawn_ranks

    results = spawn_ranks(_worker, 2, tune, timeout=300)
    assert results[0]["label"] == results[1]["label"]  # every rank's search chose the same
    assert results[0]["M"] * results[0]["b"] == SEQUENCES
    if tune:
        assert results[0]["schedule"] == "helix"
    for r in results:
        for pipe_loss, ref_loss in r["losses"]:
            assert pipe_loss == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
        assert r["worst"] <= 1e-10, r["label"]
    assert set(results[0]["owned"]) | set(results[1]["owned"]) == set(results[0]["all"])


def _dp_worker(rank: int, _cfg) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from helix_compiler import helix_compile
    from helix_compiler.models import Llama, LlamaConfig

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    torch.manual_seed(0)
    pipe = helix_compile(Llama(LlamaConfig(num_layers=4)), 2, SEQ, schedule="auto", num_microbatches=SEQUENCES,
                         mesh=mesh, timeout=30, tune={"schedules": ("helix",)})
    g = torch.Generator().manual_seed(mesh["dp"].get_local_rank())  # each dp replica its own batch
    ids = torch.randint(0, 256, (SEQUENCES, SEQ), generator=g)
    pipe(ids, ids.roll(-1, 1)).backward()
    return {"scale": dict(pipe.program.choice.scale), "label": pipe.program.choice.chosen.candidate.label()}


def test_auto_choice_on_a_mesh_counts_the_dp_replicas():
    """The memory search sees the mesh's dp size (gradients and optimizer state per replica)."""
    from helix_compiler.runtime.launch import spawn_ranks

    results = spawn_ranks(_dp_worker, 4, None, timeout=300)
    assert all(r["scale"]["dp"] == 2 for r in results), [r["scale"] for r in results]
    assert len({r["label"] for r in results}) == 1
