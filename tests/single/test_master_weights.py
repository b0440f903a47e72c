"""``master_weight_optimizer`` on a plain bf16 module (one process): the masters are exactly
an fp32 optimizer's parameters stepped on the upcast bf16 gradients, the bf16 parameters are
the masters rounded, zero_grad clears both, and the state dict (torch's and DCP's flattened
one) round-trips into a fresh optimizer that then steps bitwise alike."""

from __future__ import annotations

import copy

import pytest
import torch

from helix_compiler import HelixError, master_weight_optimizer

LR = 1e-4  # far below the bf16 spacing of the weights (~1e-3): a bf16 optimizer would round steps away


def _linear(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(8, 4).to(torch.bfloat16)


def _loss(lin: torch.nn.Linear, step: int) -> torch.Tensor:
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
    return lin(x).float().pow(2).mean()


def _train(lin, opt, steps: range, ref=None) -> None:
    for step in steps:
        _loss(lin, step).backward()
        if ref is not None:  # the fp32 reference steps on the same (upcast) bf16 gradients
            ref_opt, ref_params = ref
            for p, r in zip(lin.parameters(), ref_params, strict=True):
                r.grad = p.grad.float()
            ref_opt.step()
            ref_opt.zero_grad()
        opt.step()
        opt.zero_grad()


def test_masters_are_fp32_optimizer_params_and_params_their_rounding():
    lin = _linear()
    start = [p.detach().clone() for p in lin.parameters()]
    opt = master_weight_optimizer(lin, torch.optim.AdamW, lr=LR, weight_decay=0.1)
    ref_params = [torch.nn.Parameter(p.detach().float()) for p in lin.parameters()]
    ref_opt = torch.optim.AdamW(ref_params, lr=LR, weight_decay=0.1)
    _train(lin, opt, range(5), (ref_opt, ref_params))
    moved = 0
    for p, r, p0 in zip(lin.parameters(), ref_params, start, strict=True):
        m = opt.masters[p]
        assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
        assert torch.equal(m, r.detach())  # the fp32 optimizer's parameters, bit for bit
        assert torch.equal(p.detach(), m.to(torch.bfloat16))  # rounded to nearest
        assert opt.state[p]["exp_avg"].dtype == torch.float32 and opt.state[p]["master"] is m
        moved += int(((m - p0.float()).abs() > LR).sum())
        assert p.grad is None and m.grad is None  # zero_grad cleared both
    assert moved > 0  # the masters took the small steps (that bf16 could not hold)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)  # AdamW's own defaults, visible to schedulers


def test_state_dict_round_trips_into_a_fresh_optimizer():
    lin = _linear()
    opt = master_weight_optimizer(lin, torch.optim.AdamW, lr=LR)
    _train(lin, opt, range(3))
    saved = copy.deepcopy(opt.state_dict())
    assert {k for entry in saved["state"].values() for k in entry} == {"step", "exp_avg", "exp_avg_sq", "master"}
    other = _linear(seed=1)  # other values: the load overwrites them
    opt2 = master_weight_optimizer(other, torch.optim.AdamW, lr=1.0)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == LR
    for p, q in zip(lin.parameters(), other.parameters(), strict=True):
        assert torch.equal(opt2.masters[q], opt.masters[p]) and torch.equal(q.detach(), p.detach())
        assert torch.equal(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"])
    _train(lin, opt, range(3, 5))
    _train(other, opt2, range(3, 5))
    for p, q in zip(lin.parameters(), other.parameters(), strict=True):
        assert torch.equal(opt2.masters[q], opt.masters[p]) and torch.equal(q.detach(), p.detach())


def test_dcp_state_dict_carries_the_masters():
    """torch.distributed.checkpoint's get_state_dict / set_state_dict (what
    helix_compiler.checkpoint saves through) see the wrapper as the module's optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    lin = _linear()
    opt = master_weight_optimizer(lin, torch.optim.AdamW, lr=LR)
    _train(lin, opt, range(2))
    msd, osd = get_state_dict(lin, opt, options=options)
    assert osd["state.weight.master"].dtype == torch.float32
    assert torch.equal(osd["state.weight.master"], opt.masters[lin.weight])
    msd, osd = copy.deepcopy(msd), copy.deepcopy(osd)
    other = _linear(seed=1)
    opt2 = master_weight_optimizer(other, torch.optim.AdamW, lr=LR)
    set_state_dict(other, opt2, model_state_dict=msd, optim_state_dict=osd, options=options)
    for p, q in zip(lin.parameters(), other.parameters(), strict=True):
        assert torch.equal(opt2.masters[q], opt.masters[p]) and torch.equal(q.detach(), p.detach())
        assert torch.equal(opt2.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
        assert int(opt2.state[q]["step"]) == 2


def test_rejects_what_is_not_an_optimizer_class():
    with pytest.raises(HelixError, match="must be a torch.optim.Optimizer subclass"):
        master_weight_optimizer(_linear(), torch.optim.AdamW(_linear().parameters()))
