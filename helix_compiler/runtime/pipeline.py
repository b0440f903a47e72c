"""``HelixPipeline``: one rank's :class:`StageProgram` as an ``nn.Module``.

``loss = pipe(input_ids, labels, **inputs)`` runs the forward half of this rank's program over
all micro batches and returns the step's loss (the same value on every rank): the mean over
the step's counted tokens when the program was compiled with ``loss_reduction="tokens"`` (what
the single-process model computes on the whole batch), else the mean of the micro batches'
losses. ``inputs`` are the extra per-token inputs the program was compiled with
(``position_ids``, ``attention_mask``, document ids); an omitted ``position_ids`` is
0..seq-1 and an omitted ``attention_mask`` all ones, as in Hugging Face models;
``loss.backward()`` runs the backward half (first in, last out). Schedules that interleave
forward and backward (1F1B) run the whole step in ``forward`` and ``backward`` only returns.
Under ``torch.no_grad()`` a call runs the forward-only program: nothing is stashed, no
backward is pending, and training can go on afterwards. ``pipe.train()`` / ``pipe.eval()``
switch dropout on and off.

Trust: every input is checked on every rank before the first message (type, dtype, device,
shape, token and label ranges), so all ranks raise together; the ranks agree on a hash of the
batch before any message (``check_batch``); a step that fails part-way leaves the pipeline
broken, and every later call says so instead of running on a half-finished state.
"""

from __future__ import annotations

import torch

from ..errors import HelixError, RuntimeFailure
from ..ir.schedule import Schedule
from ..ir.stage_program import StageProgram
from .batch_checks import DEFAULT_INPUTS, check_documents
from .data_parallel import GradientReducer
from .executor import Executor, InstrHook
from .fingerprint import Agreement, agree, agree_all, tensor_hash
from .precision import check_param_dtypes, compiled_dtypes, param_dtype_agreement, step_recv_specs
from .state_dict import load_owned_state_dict, rebind_owned, register_owned, tp_local


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (dp_shard), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


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
    def __init__(self, stages: tuple[StageProgram, ...], *, rank: int, transport, schedule: Schedule | None = None,
                 hooks: tuple[InstrHook, ...] = (), record_trace: bool = False, check_batch: bool = True,
                 dp_transport=None, tp_transport=None, dp_shard: bool = False, dp_mesh=None):
        super().__init__()
        self.stages, self.rank, self.transport = stages, rank, transport
        self.stage = stages[rank]
        self._schedule = schedule
        self.check_batch = check_batch
        # data parallelism: the same pipeline rank of every replica, each on its own batch
        self.dp_transport = dp_transport
        self.dp_size = dp_transport.world_size if dp_transport is not None else 1
        # dp_shard: parameters and gradients sharded over dp between steps (runtime.dp_shard)
        self.dp_shard = bool(dp_shard)
        self.sharder = None
        if self.dp_shard:
            if self.dp_size == 1:
                raise HelixError("dp_shard=True needs a data-parallel group of more than one rank: pass "
                                 "mesh= with a 'dp' dimension of size > 1, or dp_shard=False")
            from .dp_shard import DpSharder, ShardedGradientReducer

            self.sharder = DpSharder(self.stage, dp_transport, dp_mesh)
            self.reducer = ShardedGradientReducer(self.stage, dp_transport, self.sharder)
        else:
            self.reducer = GradientReducer(self.stage, dp_transport) if self.dp_size > 1 else None
        # tensor parallelism: the other ranks of this stage, each holding its shard of the split
        # parameters and the same copy of the others; all are given the same batch
        self.tp_transport = tp_transport
        self.tp_size = self.stage.tp_size
        if (tp_transport.world_size if tp_transport is not None else 1) != self.tp_size:
            raise HelixError(f"the stage program was lowered for tp={self.tp_size} but the tp group has "
                             f"{tp_transport.world_size if tp_transport is not None else 1} ranks")
        if self.reducer is not None:
            hooks = (*hooks, self.reducer.hook)
        self.executor = Executor(self.stage, transport=transport, hooks=hooks, record_trace=record_trace)
        self.head_rank = self.stage.head_rank
        self._params = dict(self.stage.params)
        register_owned(self, self.stage)  # owned tensors as attributes under the user's names
        if self.sharder is not None:  # the dp shards in their place; the graphs keep the full ones
            self.sharder.register(self)
        self._compiled_dtypes = compiled_dtypes(self.stage)  # each step checks them (precision)
        self._pending_backward = False
        self._broken: str | None = None
        self._steps = 0
        self._grad_before: dict[str, torch.Tensor | None] = {}

    # ------------------------------------------------------------------------ parameters
    # named_parameters / state_dict / to are nn.Module's own over the registered tensors
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """This rank's entries, or a whole model's state dict (other ranks' keys are ignored;
        a missing owned key is an error that names it), by the user's names."""
        if self.sharder is not None:  # a full tensor of a sharded parameter loads this rank's rows
            aliases = self.stage.owned_state.aliases  # (of its tp piece, under tp)
            state_dict = {k: self.sharder.local(aliases.get(k, k), tp_local(self.stage, aliases.get(k, k), v))
                          for k, v in state_dict.items()}
        return load_owned_state_dict(self, state_dict, strict=strict, assign=assign)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        rebind_owned(self)  # buffers (and swapped parameters) are new objects: the graphs follow
        return out

    def gather_state_dict(self, dst: int = 0) -> dict[str, torch.Tensor] | None:
        """The full model's parameters (original names) on pipeline rank ``dst`` (of tp rank 0),
        None elsewhere. A collective: every rank must call it."""
        mine = ({k: v.clone() for k, v in self.state_dict().items()} if self.sharder is None
                else self.sharder.full_state(self.state_dict()))  # dp shards gathered whole
        if self.tp_size > 1:  # put the split parameters back together on tp rank 0
            pieces = self.tp_transport.gather_objects(mine, dst=0)
            mine = {} if pieces is None else {
                k: (self.stage.tp_shards[k].unshard([p[k] for p in pieces]) if k in self.stage.tp_shards else v)
                for k, v in mine.items()}
        parts = self.transport.gather_objects(mine, dst=dst)
        if self.tp_size > 1 and self.stage.tp_rank != 0:
            return None
        if parts is None:
            return None
        full: dict[str, torch.Tensor] = {}
        for part in parts:
            full.update(part)
        return full

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model: the norm of every gradient
        of every pipeline rank (a parameter held by several ranks counted once; dp replicas
        hold equal reduced gradients, so they are counted once too), returned on every rank,
        and this rank's gradients scaled by ``max_norm / (norm + 1e-6)`` when that is below 1.
        A collective over the pipeline group: every rank must call it."""
        norm_type = float(norm_type)
        tp_first = self.stage.tp_rank == 0  # a parameter every tp rank holds whole is counted on one
        params = self._params if self.sharder is None else self.sharder.current_shards()
        mine = [_local(p.grad) for n, p in params.items() if p.grad is not None
                and (n not in self.stage.shared or self.rank == min(self.stage.shared[n].holders))
                and (tp_first or n in self.stage.tp_shards)]
        dtype = torch.float64
        if norm_type == float("inf"):
            local = max((g.detach().abs().max().to(dtype) for g in mine), default=torch.zeros((), dtype=dtype))
            local = local.reshape(1).clone()
            if self.sharder is not None:
                self.dp_transport.all_reduce_(local, "max", what="gradient norm (inf) over dp shards")
            if self.tp_size > 1:
                self.tp_transport.all_reduce_(local, "max", what="gradient norm (inf) over tp")
            total = self.transport.all_reduce_(local, "max", what="gradient norm (inf)")[0]
        else:
            local = sum((g.detach().to(dtype).abs().pow(norm_type).sum() for g in mine), torch.zeros((), dtype=dtype))
            local = local.reshape(1).clone()
            if self.sharder is not None:  # each dp rank holds its part of the gradients: summed once
                self.dp_transport.all_reduce_(local, what=f"gradient norm ({norm_type:g}) over dp shards")
            if self.tp_size > 1:
                self.tp_transport.all_reduce_(local, what=f"gradient norm ({norm_type:g}) over tp")
            total = self.transport.all_reduce_(local, what=f"gradient norm ({norm_type:g})")[0]
            total = total.pow(1.0 / norm_type)
        coef = float(max_norm) / (float(total) + 1e-6)
        if coef < 1.0:
            for p in params.values():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return total

    def stage_graphs(self, rank: int | None = None) -> dict[str, torch.fx.GraphModule]:
        """The segment GraphModules that ``rank`` (default: this one) runs forward."""
        stage = self.stages[self.rank if rank is None else rank]
        return {name: seg.gm for name, seg in stage.segments.items()}

    @property
    def schedule(self) -> Schedule | None:
        return self._schedule

    def train(self, mode: bool = True):
        super().train(mode)
        self.executor.training = mode
        return self

    # ------------------------------------------------------------------------ checks
    def _batch(self, args, kwargs) -> list[torch.Tensor]:
        """The inputs by the program's input names, checked locally (every rank sees the same
        batch, so every rank raises the same error before any message)."""
        st = self.stage
        names = st.input_names
        if len(args) > len(names):
            raise HelixError(f"pipe() takes {len(names)} inputs {list(names)}; got {len(args)} positional arguments")
        given = dict(zip(names, args, strict=False))
        for k, v in kwargs.items():
            if k not in names:
                fix = (f"; compile with inputs=({k!r},) to pass it to the model" if k not in ("input_ids", "labels")
                       else "")
                raise HelixError(f"pipe() got an unexpected input {k!r}; the program takes {list(names)}{fix}")
            if k in given:
                raise HelixError(f"pipe() got input {k!r} twice (positional and keyword)")
            given[k] = v
        want = (st.num_microbatches * st.micro_batch_size, st.seq_len)
        out = []
        for name in names:
            t = given.get(name)
            if t is None and name in DEFAULT_INPUTS and isinstance(given.get("input_ids"), torch.Tensor):
                t = DEFAULT_INPUTS[name](given["input_ids"])
            if t is None:
                fix = (" The pipeline trains on the loss the model computes from labels: pass labels "
                       "(for next-token prediction, labels=input_ids as Hugging Face models shift them "
                       "themselves)") if name == "labels" else ""
                raise HelixError(f"rank {self.rank}: {name} is missing (None).{fix}")
            if not isinstance(t, torch.Tensor):
                raise HelixError(f"rank {self.rank}: {name} must be a torch.Tensor, got {type(t).__name__}")
            integral = name in ("input_ids", "labels", "position_ids") or name in st.document_inputs
            if integral and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool) or (
                    name == "attention_mask" and (t.is_floating_point() or t.is_complex())):
                raise HelixError(f"rank {self.rank}: {name} has dtype {t.dtype}; token ids, labels, positions, "
                                 f"document ids and masks must be an integer dtype (torch.long): pass "
                                 f"{name}.long() if the values are integral")
            device = getattr(self.transport, "device", None)
            if device is not None and t.device != torch.device(device):
                raise HelixError(f"rank {self.rank}: {name} is on {t.device} but this rank computes on {device}; "
                                 f"move the batch with {name}.to({str(device)!r})")
            if tuple(t.shape) != want:
                raise HelixError(
                    f"rank {self.rank}: {name} has shape {tuple(t.shape)} but the program was compiled for "
                    f"{want} (num_microbatches={st.num_microbatches} x micro_batch_size={st.micro_batch_size}, "
                    f"seq_len={st.seq_len}); recompile or reshape the batch")
            out.append(t)
        batch = dict(zip(names, out, strict=True))
        self._check_ranges(batch)
        check_documents(batch, st, self.rank)
        return out

    def _check_ranges(self, batch: dict[str, torch.Tensor]) -> None:
        vocab, ignore = self.stage.vocab_size, self.stage.ignore_index
        if vocab is None:
            return
        ids = batch.get("input_ids")
        if ids is not None and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= vocab:
                raise HelixError(f"rank {self.rank}: input_ids hold values in [{lo}, {hi}] but the embedding has "
                                 f"{vocab} rows; token ids must lie in [0, {vocab})")
        labels = batch.get("labels")
        if labels is not None and labels.numel():
            bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore)
            if bool(bad.any()):
                v = int(labels[bad][0])
                raise HelixError(f"rank {self.rank}: labels hold {v}, outside [0, {vocab}) and not the loss's "
                                 f"ignore_index {ignore}; fix the labels or mask them with {ignore}")

    def _agree_on_batch(self, batch: list[torch.Tensor], tokens: int | None) -> None:
        """One collective: the ranks' parameters are in their compiled dtypes (no
        ``pipe.to(dtype)``, see precision), the ranks hold the same batch (``check_batch``) and
        count the same number of loss tokens (always, when the loss is a token mean)."""
        h = tuple(tensor_hash(t) for t in batch) if self.check_batch else ()
        what = ("the batch (hash of " + ", ".join(self.stage.input_names) + ")") if self.check_batch else ""
        if tokens is not None:
            h += (tokens,)
            what += (" and " if what else "") + "the step's counted loss tokens"
        fix = ("every rank must call pipe() with the same batch; pass check_batch=False to helix_compile "
               "to skip the batch hash")
        agree_all(self.transport, [param_dtype_agreement(self), *([Agreement(h, what, fix)] if h else [])])
        if self.tp_size > 1:
            agree_all(self.tp_transport, [param_dtype_agreement(self, over_tp=True),
                                          *([Agreement(h, what + " over the tp ranks of a stage", fix)] if h else [])])
        check_param_dtypes(self)  # the ranks agree on them: all raise, or none

    def _count_tokens(self, inputs: list[dict[str, torch.Tensor]]) -> int | None:
        """The step's counted loss tokens (labels the loss does not ignore), or None when the
        step's loss is the mean of the micro batches' losses."""
        count = self.stage.token_count
        if count is None:
            return None
        total = int(sum(int(count(mb)) for mb in inputs))
        if self.dp_size > 1:  # the step's tokens over every replica: the loss divides by them all
            local = torch.tensor([total], dtype=torch.int64)
            self.dp_transport.all_reduce_(local, what=f"counted loss tokens, step {self._steps + 1}")
            total = int(local)
        if total == 0:
            raise HelixError(f"rank {self.rank}: no label of this batch is counted by the loss (every label is "
                             f"the ignore_index {count.ignore_index}), so the token-mean loss is 0/0; skip the "
                             f"batch or unmask some labels")
        return total

    def _usable(self) -> None:
        if self._broken is not None:
            raise HelixError(f"rank {self.rank}: this pipeline is broken: {self._broken}. Its ranks may be "
                             f"part-way through different instructions; rebuild it with helix_compile")

    # ------------------------------------------------------------------------ running
    def forward(self, *args, **kwargs) -> torch.Tensor:
        self._usable()
        batch = self._batch(args, kwargs)
        if self._pending_backward:
            raise HelixError(f"rank {self.rank}: forward() called twice without backward(): call "
                             f"loss.backward() on the previous loss first (or run evaluation under "
                             f"torch.no_grad(), which keeps no backward pending)")
        st = self.stage
        inputs = [dict(zip(st.input_names, parts, strict=True))
                  for parts in zip(*(t.split(st.micro_batch_size) for t in batch), strict=True)]
        evaluating = not torch.is_grad_enabled()
        tokens = self._count_tokens(inputs)
        # every rank raises together, before any message: nothing to break
        self._agree_on_batch(batch, tokens)
        try:
            ex = self.executor
            divisor = tokens if tokens is not None else st.num_microbatches * self.dp_size
            ex.begin(inputs, forward_only=evaluating, loss_divisor=divisor, recv_specs=step_recv_specs(self))
            if self.reducer is not None and not evaluating:
                self.reducer.begin()
            self._steps += 1
            if self.sharder is not None:  # the full parameters for this call, gathered once
                self.sharder.unshard(self._steps)
            if evaluating:
                ex.run(0, ex.num_instrs)
                if self.sharder is not None:
                    self.sharder.reshard()
                value = self._loss_value()
                self.transport.drain()
                return value.to(self._loss_dtype())
            # shared parameters all-reduce only this step's gradient (users may accumulate)
            self._grad_before = {n: (self._params[n].grad.clone() if self._params[n].grad is not None else None)
                                 for n in (*st.shared, *st.tp_partial_grads) if n in self._params}
            if st.forward_first:
                ex.run(0, st.split)
                self._pending_backward = True
            else:
                ex.run(0, ex.num_instrs)
                self._finish()
            value = self._loss_value()
        except BaseException as e:
            self._break(e)
            raise
        anchor = torch.zeros((), requires_grad=True)
        return _PipelineLoss.apply(anchor, value.to(self._loss_dtype()), self)

    def _loss_dtype(self) -> torch.dtype:
        head = next(iter(s for s in self.stages if s.head in s.segments)).segments[self.stage.head]
        return head.output_specs[0][1] if head.output_specs else torch.float32

    def _loss_value(self) -> torch.Tensor:
        st = self.stage
        if self.rank == self.head_rank:
            losses = self.executor.state.losses
            if len(losses) != st.num_microbatches:
                raise RuntimeFailure(f"rank {self.rank}: loss known for {len(losses)} of {st.num_microbatches} "
                                     f"micro batches", rank=self.rank)
            stacked = torch.stack([losses[m] for m in sorted(losses)])
            if st.token_count is None and self.dp_size == 1:
                value = stacked.mean().to(torch.float64)
            else:  # this replica's share: its sums over the whole step's divisor
                value = stacked.to(torch.float64).sum() / self.executor.loss_divisor
        else:
            value = torch.zeros((), dtype=torch.float64)
        self.transport.broadcast_(value, src=self.head_rank, what=f"loss broadcast after step {self._steps}")
        if self.dp_size > 1:
            self.dp_transport.all_reduce_(value, what=f"loss sum over dp, step {self._steps}")
        return value

    def _backward_half(self, grad: float) -> None:
        if not self._pending_backward:
            # the whole step already ran in forward (interleaved schedule), seeded with 1
            if grad != 1.0:
                raise HelixError(f"rank {self.rank}: loss.backward() reached the pipeline with gradient {grad:g}, "
                                 f"but schedule={self.stage.kind!r} runs its backward inside pipe(...) with "
                                 f"gradient 1, so the scaled loss (loss / n, loss * c) cannot change it; call "
                                 f"loss.backward() on the loss itself and scale the gradients (or the learning "
                                 f"rate), or use schedule='helix' or 'gpipe', whose backward runs here")
            return
        self._usable()
        ex = self.executor
        try:
            ex.grad_scale = grad
            ex.run(self.stage.split, ex.num_instrs)
            self._pending_backward = False
            self._finish()
        except BaseException as e:
            self._break(e)
            raise

    def _break(self, e: BaseException) -> None:
        self._pending_backward = False
        if self.reducer is not None:
            self.reducer.abort()
        if self.sharder is not None:
            self.sharder.reshard()
        self._broken = f"step {self._steps} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        self.executor.state.clear()

    def _finish(self) -> None:
        self.transport.drain()
        # parameters used on several ranks (a tied embedding/head on different stages)
        for name, shared in self.stage.shared.items():
            p = self._params.get(name)
            if p is None:  # held by other ranks: join the sum with zeros
                self.transport.all_reduce_(torch.zeros(shared.shape, dtype=shared.dtype),
                                           what=f"gradient sum of {name}, step {self._steps}")
                continue
            before = self._grad_before.get(name)
            if p.grad is not None:
                step = p.grad - before if before is not None else p.grad.clone()
            else:
                step = torch.zeros_like(p)
            self.transport.all_reduce_(step, what=f"gradient sum of {name}, step {self._steps}")
            p.grad = step if before is None else before + step
        # parameters every tp rank holds whole but uses on its part of the activations (norms
        # under sequence parallelism): each rank's gradient is a part of the sum (taken before
        # the dp reduction, which defers them, so that dp_shard reduce-scatters whole sums)
        for name in self.stage.tp_partial_grads:
            p = self._params[name]
            before = self._grad_before.get(name)
            step = torch.zeros_like(p) if p.grad is None else (p.grad - before if before is not None else p.grad.clone())
            self.tp_transport.all_reduce_(step, what=f"gradient sum of {name} over tp, step {self._steps}")
            p.grad = step if before is None else before + step
        if self.reducer is not None:
            self.reducer.finish()
        if self.sharder is not None:  # the gradients are in the shards: free the full parameters
            self.sharder.reshard()

    def check_consistent(self) -> None:
        """Once, before the first step (``helix_compile`` calls it): every rank compiled the
        same program, and every parameter used on several ranks starts equal on them."""
        compiled = (int(self.stage.fingerprint, 16) & (2**63 - 1),)
        fix = "compile the same model with the same options (num_microbatches, seq_len, ...) on every rank"
        agree(self.transport, compiled, what="the compiled program", fix=fix)
        if self.tp_size > 1:
            agree(self.tp_transport, compiled, what="the compiled program (tp ranks)", fix=fix)
            whole = [n for n in self._params if n not in self.stage.tp_shards]
            held = self._params if self.sharder is None else {n: s.to_local() for n, s in self.sharder.shards.items()}
            if whole:  # (under dp_shard: this dp index's rows, the same on the tp ranks)
                agree(self.tp_transport, tuple(tensor_hash(held[n]) for n in whole),
                      what=f"the initial values of the {len(whole)} parameters every tp rank holds whole",
                      fix="initialize the model identically on every rank (same seed) or load the same checkpoint")
        for name, shared in self.stage.shared.items():
            p = self._params.get(name)
            if p is not None and self.sharder is not None:  # this dp index's rows, equal on the holders
                p = self.sharder.shards[name].to_local()
            h = (tensor_hash(p),) if p is not None else (0,)
            agree(self.transport, h, what=f"the initial value of {name} (used on ranks {list(shared.holders)})",
                  fix="initialize the model identically on every rank (same seed) or load the same checkpoint",
                  ranks=shared.holders)
