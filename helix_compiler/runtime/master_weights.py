"""fp32 master weights for bf16 (or fp16) parameters: :func:`master_weight_optimizer`.

The forward and backward run on the low-precision parameters (the model compiled in bf16;
see ``precision``). The optimizer keeps an fp32 copy of each of them (the *master*) and
steps that: before the step each low-precision gradient is copied (upcast) into its
master's ``.grad``, the wrapped optimizer (``optimizer_class`` over the masters, its state
in fp32 too) steps the masters, and each stepped master is copied (rounded to nearest) back
into its parameter. Updates smaller than the parameter's bf16 spacing thus accumulate in the
master instead of being rounded away.

Hand-written because torch has no such wrapper for a plain module: ``torch.optim`` steps
parameters in their own dtype (its state follows the parameter dtype), FSDP2's
``MixedPrecisionPolicy`` only applies under ``fully_shard`` (parameters become DTensors,
which the pipeline's segment graphs do not read), and ``torch.autocast`` keeps fp32
parameters instead (the other way to get fp32 weights: ``README``, mixed precision).

``MasterWeightOptimizer`` is a ``torch.optim.Optimizer`` whose ``param_groups`` hold the
model's own (bf16) parameters, so LR schedulers, ``zero_grad`` and torch's
``get_state_dict`` / ``set_state_dict`` (hence ``helix_compiler.checkpoint``, which reshards)
see it as the optimizer of those parameters: ``state[p]`` is the wrapped optimizer's fp32
state of ``p``'s master plus ``"master"`` (the fp32 master itself), saved as
``optim.state.<fqn>.master`` next to ``exp_avg`` and the others.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch

from ..errors import HelixError

MASTER = "master"  # the state key of a parameter's fp32 master


class MasterWeightOptimizer(torch.optim.Optimizer):
    """``optimizer_class`` over fp32 masters of ``params`` (parameters or parameter groups,
    as for any optimizer); ``defaults`` are ``optimizer_class``'s keyword arguments."""

    def __init__(self, params: Iterable, optimizer_class: type[torch.optim.Optimizer], *,
                 master_dtype: torch.dtype = torch.float32, **defaults: Any):
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise HelixError(f"optimizer_class={optimizer_class!r} must be a torch.optim.Optimizer subclass, "
                             f"e.g. torch.optim.AdamW")
        if optimizer_class is MasterWeightOptimizer:
            raise HelixError("optimizer_class must be the optimizer to step the masters, e.g. torch.optim.AdamW")
        if not master_dtype.is_floating_point:
            raise HelixError(f"master_dtype={master_dtype} must be a floating dtype (torch.float32)")
        self.master_dtype = master_dtype
        self.masters: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> its master
        super().__init__(params, defaults)
        groups = [{**self._hyper(g), "params": [self._master(p) for p in g["params"]]} for g in self.param_groups]
        self.inner = optimizer_class(groups, **defaults)
        self.defaults = dict(self.inner.defaults)
        for mine, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            mine.update(self._hyper(inner))  # every hyperparameter, as optimizer_class filled them in

    @staticmethod
    def _hyper(group: dict) -> dict:
        return {k: v for k, v in group.items() if k != "params"}

    def _master(self, p: torch.Tensor) -> torch.Tensor:
        if not p.is_floating_point():
            raise HelixError(f"master_weight_optimizer: a parameter of dtype {p.dtype} cannot have a floating "
                             f"master; pass floating parameters only")
        if p not in self.masters:
            self.masters[p] = p.detach().to(self.master_dtype, copy=True)
        return self.masters[p]

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "inner"):  # after __init__: the new group gets masters too
            g = self.param_groups[-1]
            self.inner.add_param_group({**self._hyper(g), "params": [self._master(p) for p in g["params"]]})
            g.update(self._hyper(self.inner.param_groups[-1]))

    def _params(self) -> list[torch.Tensor]:
        return list(chain.from_iterable(g["params"] for g in self.param_groups))

    def _sync_hyper(self) -> None:
        """The wrapper's groups are the ones users and schedulers change (``lr``): copy them in."""
        for mine, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            inner.update(self._hyper(mine))

    def _refresh_state(self) -> None:
        self.state = defaultdict(dict)
        for p in self._params():
            m = self.masters[p]
            if m in self.inner.state:
                self.state[p] = {**self.inner.state[m], MASTER: m}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyper()
        stepped = []
        for p in self._params():
            m = self.masters[p]
            if p.grad is None:
                m.grad = None
                continue
            if m.grad is None or m.grad.shape != p.grad.shape:
                m.grad = p.grad.detach().to(m.dtype, copy=True)
            else:
                m.grad.copy_(p.grad)  # upcast
            stepped.append((p, m))
        self.inner.step()
        for p, m in stepped:
            p.copy_(m)  # rounded to nearest
        self._refresh_state()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state dict over the wrapper's parameters: each parameter's entry is
        its master's fp32 state plus ``"master"``."""
        self._sync_hyper()
        self._refresh_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what ``state_dict`` saved (entries without ``"master"``, as from a plain
        optimizer, take the master from the parameter's current value) and copy each master,
        rounded, into its parameter."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups, strict=False)):
            raise ValueError("loaded state dict has a different number of parameter groups or parameters per "
                             "group than this optimizer")
        ids = dict(zip(chain.from_iterable(g["params"] for g in saved_groups), self._params(), strict=True))
        inner_state, masters = {}, {}
        for key, entry in state_dict["state"].items():
            entry = dict(entry)
            if MASTER in entry:
                masters[ids[key]] = entry.pop(MASTER)
            inner_state[key] = entry
        self.inner.load_state_dict({"state": inner_state, "param_groups": saved_groups})
        with torch.no_grad():
            for p in self._params():
                m = self.masters[p]
                saved = masters.get(p)
                m.copy_(saved if saved is not None else p)
                p.copy_(m)
        for mine, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            mine.update(self._hyper(inner))
        self._refresh_state()


def master_weight_optimizer(module: torch.nn.Module, optimizer_class: type[torch.optim.Optimizer], *,
                            master_dtype: torch.dtype = torch.float32, **defaults: Any) -> MasterWeightOptimizer:
    """``optimizer_class(module.parameters(), **defaults)`` stepping fp32 masters of the
    parameters (a pipeline's: this rank's owned ones; any ``nn.Module``'s). Use it with a
    model compiled in bf16::

        pipe = helix_compile(model.to(torch.bfloat16), pp_size, seq_len)
        opt = helix_compiler.master_weight_optimizer(pipe, torch.optim.AdamW, lr=3e-4)
        pipe(ids, labels).backward(); pipe.clip_grad_norm_(1.0); opt.step(); opt.zero_grad()

    Memory: 4 bytes per parameter element for the master besides the optimizer's fp32
    state. Not combined with ``sharded_optimizer`` (ZeRO-1) or ``dp_shard`` yet."""
    if getattr(module, "dp_shard", False):
        raise HelixError("master_weight_optimizer is not combined with dp_shard=True yet (its parameters are "
                         "DTensor shards); use dp_shard=False, or a plain optimizer")
    return MasterWeightOptimizer(module.parameters(), optimizer_class, master_dtype=master_dtype, **defaults)
