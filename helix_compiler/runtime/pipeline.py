"""``helix_compile``: the compiled program as an ``nn.Module`` on one rank of a process group.

``loss = pipe(input_ids, labels)`` runs the forward half of this rank's schedule over all micro
batches and returns the mean micro-batch loss (the same value on every rank);
``loss.backward()`` runs the backward half (first in, last out). Schedules that interleave
forward and backward (1F1B) run the whole step in ``forward`` and ``backward`` only returns.
The loss is the mean over micro batches of the model's own loss, which equals the full-batch
loss when every micro batch has the same number of counted tokens.
"""

from __future__ import annotations

import torch

from ..errors import HelixError
from ..program import HelixProgram, compile_program
from .executor import Executor, all_forward_first


class _PipelineLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, value, pipe):
        ctx.pipe = pipe
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.pipe._backward_half(float(grad))
        return None, None, None


class HelixPipeline(torch.nn.Module):
    def __init__(self, program: HelixProgram, *, rank: int, transport, record_trace: bool = False):
        super().__init__()
        if program.schedule is None:
            raise HelixError("the program has no schedule")
        cfg = program.config
        self.program, self.rank, self.transport = program, rank, transport
        self.config = cfg
        self.executor = Executor(rank, program.schedule.programs[rank], program.segments, transport=transport,
                                 micro_batch_size=cfg.micro_batch_size, seq_len=cfg.seq_len,
                                 num_microbatches=cfg.num_microbatches,
                                 record_trace=record_trace)
        self._split = self.executor.split_point()
        head = program.segments[-1].name
        # every rank must agree, or one would wait in the loss broadcast while another still runs
        self._forward_only_first = all(all_forward_first(p, head) for p in program.schedule.programs)
        self.head_rank = next(r for r, p in enumerate(program.schedule.programs) if any(i.op == "F" and i.seg == head for i in p))
        # canonical names: the (adapted) model's own, first name of each tied parameter
        self._params = dict(program.captured.module.named_parameters())
        self._owned = self._params_on(rank)
        holders: dict[str, list[int]] = {}
        for r in range(cfg.pp_size):
            for name in self._params_on(r):
                holders.setdefault(name, []).append(r)
        # used on several ranks (a tied embedding and head on different stages): all-reduced
        self._shared = sorted(n for n, rs in holders.items() if len(rs) > 1)
        self._pending_backward = False
        self._grad_before: dict[str, torch.Tensor | None] = {}

    def _params_on(self, rank: int) -> list[str]:
        """Canonical names (first name of each parameter object) of the parameters ``rank`` uses."""
        gm = self.program.captured.gm
        canonical = {id(p): n for n, p in self._params.items()}
        segs = {i.seg for i in self.program.schedule.programs[rank] if i.op == "F"}
        used = {canonical[id(gm.get_parameter(p))] for s in self.program.segments if s.name in segs for p in s.params}
        return [n for n in self._params if n in used]

    # ------------------------------------------------------------------------ parameters
    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name in self._owned:
            yield prefix + self.program.captured.user_fqn(name), self._params[name]

    def state_dict(self, *args, **kwargs):
        return {fqn: p.detach() for fqn, p in self.named_parameters()}

    def gather_state_dict(self, dst: int = 0) -> dict[str, torch.Tensor] | None:
        """The full model's parameters (original names) on rank ``dst``, None elsewhere.
        A collective: every rank must call it."""
        parts = self.transport.gather_objects({k: v.clone() for k, v in self.state_dict().items()}, dst=dst)
        if parts is None:
            return None
        full: dict[str, torch.Tensor] = {}
        for part in parts:
            full.update(part)
        return full

    def stage_graphs(self, rank: int | None = None) -> dict[str, torch.fx.GraphModule]:
        """The segment GraphModules that ``rank`` (default: this one) runs forward."""
        rank = self.rank if rank is None else rank
        segs = {i.seg for i in self.program.schedule.programs[rank] if i.op == "F"}
        return {s.name: s.gm for s in self.program.segments if s.name in segs}

    @property
    def schedule(self):
        return self.program.schedule

    # ------------------------------------------------------------------------ running
    def _check_batch(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        c = self.config
        want = (c.num_microbatches * c.micro_batch_size, c.seq_len)
        for name, t in (("input_ids", input_ids), ("labels", labels)):
            if tuple(t.shape) != want:
                raise HelixError(
                    f"rank {self.rank}: {name} has shape {tuple(t.shape)} but the program was compiled for "
                    f"{want} (num_microbatches={c.num_microbatches} x micro_batch_size={c.micro_batch_size}, "
                    f"seq_len={c.seq_len}); recompile or reshape the batch")

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check_batch(input_ids, labels)
        if self._pending_backward:
            raise HelixError("forward() called twice without backward(): call loss.backward() first")
        c = self.config
        ex = self.executor
        ex.inputs = [{"input_ids": ids, "labels": lab} for ids, lab in zip(
            input_ids.split(c.micro_batch_size), labels.split(c.micro_batch_size), strict=True)]
        ex.state.losses.clear()
        ex.grad_scale = 1.0
        ex.trace.clear()
        ex.reset()
        # shared parameters all-reduce only this step's gradient (users may accumulate)
        self._grad_before = {n: (self._params[n].grad.clone() if self._params[n].grad is not None else None)
                             for n in self._shared if n in self._owned}
        if self._forward_only_first:
            ex.run(0, self._split)
            self._pending_backward = True
        else:
            ex.run(0, len(ex.program.instrs))
            self._finish()
        value = self._loss_value().to(self.program.segments[-1].output_meta[0][1])
        anchor = torch.zeros((), requires_grad=True)
        return _PipelineLoss.apply(anchor, value, self)

    def _loss_value(self) -> torch.Tensor:
        c = self.config
        if self.rank == self.head_rank:
            losses = self.executor.state.losses
            if len(losses) != c.num_microbatches:
                raise HelixError(f"rank {self.rank}: loss known for {len(losses)} of {c.num_microbatches} micro batches")
            value = torch.stack([losses[m] for m in sorted(losses)]).mean().to(torch.float64)
        else:
            value = torch.zeros((), dtype=torch.float64)
        self.transport.broadcast_(value, src=self.head_rank)
        return value

    def _backward_half(self, grad: float) -> None:
        if not self._pending_backward:
            return  # the whole step already ran in forward (interleaved schedule)
        ex = self.executor
        ex.grad_scale = grad
        ex.run(self._split, len(ex.program.instrs))
        self._pending_backward = False
        self._finish()

    def _finish(self) -> None:
        self.transport.drain()
        # parameters used on several ranks (a tied embedding/head on different stages)
        for name in self._shared:
            p = self._params[name]
            before = self._grad_before.get(name)
            if name in self._owned and p.grad is not None:
                step = p.grad - before if before is not None else p.grad.clone()
            else:
                step = torch.zeros_like(p)
            self.transport.all_reduce_(step)
            if name in self._owned:
                p.grad = step if before is None else before + step


def helix_compile(model: torch.nn.Module, pp_size: int, seq_len: int, *, num_microbatches: int | None = None,
                  num_folds: int = 2, micro_batch_size: int = 1, loss_fn=None, recompute: str = "without_attention",
                  mlp_chunks: int | None = None, schedule: str = "helix", head_stage: int | str | None = None,
                  timeout: float = 60.0,
                  record_trace: bool = False, transport=None, example_inputs=None) -> HelixPipeline:
    """Compile ``model`` for ``pp_size`` pipeline ranks and return this rank's pipeline module.

    Needs an initialized process group of ``pp_size`` ranks (``torchrun``)."""
    from .transport import Transport

    if transport is None:
        transport = Transport(timeout=timeout)
    if transport.world_size != pp_size:
        raise HelixError(f"pp_size={pp_size} but the process group has {transport.world_size} ranks; "
                         f"launch with torchrun --nproc-per-node {pp_size}")
    if schedule == "helix" and num_microbatches is None:
        num_microbatches = pp_size * num_folds
    program = compile_program(model, pp_size=pp_size, seq_len=seq_len, num_microbatches=num_microbatches,
                              num_folds=num_folds if schedule == "helix" else 1, micro_batch_size=micro_batch_size,
                              recompute=recompute, mlp_chunks=mlp_chunks, schedule=schedule, head_stage=head_stage,
                              loss_fn=loss_fn,
                              example_inputs=example_inputs)
    return HelixPipeline(program, rank=transport.rank, transport=transport, record_trace=record_trace)
