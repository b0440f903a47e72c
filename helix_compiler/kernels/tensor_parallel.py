"""The tensor-parallel collectives the compiled segment graphs call (Megatron's f and g, and
their sequence-parallel forms).

``passes.tensor_parallel`` inserts them around each parallel region of a layer:

* ``tp_copy(x, group)`` before a column-parallel matmul whose input is replicated: the
  identity forward; backward sums the input gradient over the tp group (each rank's column
  shard contributes a part);
* ``tp_reduce(x, group)`` after a row-parallel matmul whose output stays replicated: sums
  the partial products over the tp group forward; backward is the identity;
* with sequence parallelism, ``sp_all_gather(x, dim, group)`` (all-gather along the
  sequence forward, reduce-scatter backward) replaces f, and ``sp_reduce_scatter(x, dim,
  group)`` (reduce-scatter forward, all-gather backward) replaces g; where a sequence-split
  tensor meets one every rank holds whole, ``sp_split`` takes the rank's part (backward:
  all-gather) and ``sp_gather`` makes the split one whole for replicated work (backward: the
  rank's part of the gradient).

All are ``autograd.Function``s over ``torch.distributed._functional_collectives`` (torch's
autograd rules for its collectives are each other's transposes, not these conjugate pairs).

Vocabulary parallelism (the embedding and the head split by vocabulary rows):
``vocab_parallel_embedding`` looks up the ids in the rank's rows (zeros elsewhere; the pass
sums the parts over the group after it) and ``vocab_parallel_cross_entropy`` is the
cross-entropy of logits split along the vocabulary, from three all-reduces (max, sum of
exponentials, target logit) without any rank holding whole logits (Megatron's). The graphs name the group by a key (``"tp"``); the runtime binds the key
to its process group with :func:`bind_tp_group` before the first step, so the compiled
graphs stay free of process-group objects (they are built offline, without one).
"""

from __future__ import annotations

import torch

_GROUPS: dict[str, object] = {}


def bind_tp_group(key: str, group) -> None:
    """Bind ``key`` (the string the graphs pass) to a process group for this process."""
    old = _GROUPS.get(key)
    if old is not None and old is not group:
        raise RuntimeError(f"tensor-parallel group {key!r} is already bound to another process group in this "
                           f"process; one process runs one tensor-parallel pipeline")
    _GROUPS[key] = group


def unbind_tp_group(key: str) -> None:
    _GROUPS.pop(key, None)


def _group(key: str):
    try:
        return _GROUPS[key]
    except KeyError:
        raise RuntimeError(f"tensor-parallel group {key!r} is not bound in this process: the segment graphs "
                           f"were compiled for tensor parallelism; run them through helix_compile(..., "
                           f"mesh=...) with a 'tp' mesh dimension") from None


def _all_reduce(x: torch.Tensor, key: str) -> torch.Tensor:
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", _group(key)))


def _all_gather(x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_gather_single(x.contiguous(), dim, _group(key)))


def _reduce_scatter(x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.reduce_scatter_single(x.contiguous(), "sum", dim, _group(key)))


def _part(x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    import torch.distributed as dist

    group = _group(key)
    return x.chunk(dist.get_world_size(group), dim)[dist.get_rank(group)].contiguous()


def _conjugate(name: str, forward, backward) -> type[torch.autograd.Function]:
    """An autograd.Function ``(x, dim, key)`` running ``forward(x, dim, key)`` and, on the
    gradient, ``backward(grad, dim, key)``."""

    def fwd(ctx, x, dim, key):
        ctx.dim, ctx.key = dim, key
        return forward(x, dim, key)

    def bwd(ctx, grad):
        return backward(grad, ctx.dim, ctx.key), None, None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


_AllGather = _conjugate("_AllGather", _all_gather, _reduce_scatter)
_ReduceScatter = _conjugate("_ReduceScatter", _reduce_scatter, _all_gather)
_Split = _conjugate("_Split", _part, _all_gather)
_Gather = _conjugate("_Gather", _all_gather, _part)


def sp_all_gather(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """All-gather along ``dim`` forward, reduce-scatter backward (before a column-parallel matmul)."""
    return _AllGather.apply(x, dim, group)


def sp_reduce_scatter(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """Reduce-scatter along ``dim`` forward, all-gather backward (after a row-parallel matmul)."""
    return _ReduceScatter.apply(x, dim, group)


def sp_split(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """This rank's part of a tensor every rank holds whole; backward all-gathers the gradient."""
    return _Split.apply(x, dim, group)


def sp_gather(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """The whole of a split tensor for work every rank repeats; backward keeps the rank's part."""
    return _Gather.apply(x, dim, group)


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, key):
        ctx.key = key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.key), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, key):
        return _all_reduce(x, key)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def tp_copy(x: torch.Tensor, group: str) -> torch.Tensor:
    """Identity forward, all-reduce (sum over the tp group) backward."""
    return _Copy.apply(x, group)


def tp_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    """All-reduce (sum over the tp group) forward, identity backward."""
    return _Reduce.apply(x, group)


def _rank_and_size(key: str) -> tuple[int, int]:
    import torch.distributed as dist

    group = _group(key)
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce_op(x: torch.Tensor, op: str, key: str) -> torch.Tensor:
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), op, _group(key)))


def vocab_parallel_embedding(weight: torch.Tensor, ids: torch.Tensor, group: str,
                             padding_idx: int = -1) -> torch.Tensor:
    """This rank's part of ``embedding(full_weight, ids)``: the rows of the ids in its
    vocabulary slice, zeros for the others (summed over the group afterwards)."""
    rank, _ = _rank_and_size(group)
    rows = weight.shape[0]
    lo = rank * rows
    mine = (ids >= lo) & (ids < lo + rows)
    local_pad = padding_idx - lo if lo <= padding_idx < lo + rows else -1
    out = torch.nn.functional.embedding((ids - lo).clamp(0, rows - 1), weight,
                                        padding_idx=local_pad if local_pad >= 0 else None)
    return out * mine.unsqueeze(-1).to(out.dtype)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, reduction, ignore_index, key):
        rank, _ = _rank_and_size(key)
        cols = logits.shape[-1]
        lo = rank * cols
        z = logits - _all_reduce_op(logits.detach().amax(-1), "max", key).unsqueeze(-1)
        exp = z.exp()
        sumexp = _all_reduce_op(exp.sum(-1), "sum", key)
        mine = (target >= lo) & (target < lo + cols)
        local = (target - lo).clamp(0, cols - 1)
        picked = z.gather(-1, local.unsqueeze(-1)).squeeze(-1) * mine.to(z.dtype)
        picked = _all_reduce_op(picked, "sum", key)
        valid = target != ignore_index
        loss = (sumexp.log() - picked) * valid.to(z.dtype)
        count = valid.sum()
        ctx.save_for_backward(exp.div_(sumexp.unsqueeze(-1)), local, mine, valid, count)
        ctx.reduction = reduction
        if reduction == 0:
            return loss
        return loss.sum() if reduction == 2 else loss.sum() / count

    @staticmethod
    def backward(ctx, grad):
        softmax, local, mine, valid, count = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, local.unsqueeze(-1), -mine.to(g.dtype).unsqueeze(-1))
        g.mul_(valid.to(g.dtype).unsqueeze(-1))
        if ctx.reduction == 0:
            g.mul_(grad.unsqueeze(-1))
        else:
            g.mul_(grad if ctx.reduction == 2 else grad / count)
        return g, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: int, ignore_index: int,
                                 group: str) -> torch.Tensor:
    """``cross_entropy(whole_logits, target, reduction=..., ignore_index=...)`` from this
    rank's vocabulary slice of ``[N, V]`` logits (``reduction`` as aten's: 0 none, 1 mean, 2
    sum); the same loss on every rank of the group."""
    return _VocabParallelCrossEntropy.apply(logits, target, reduction, ignore_index, group)


TP_COLLECTIVES = (tp_copy, tp_reduce, sp_all_gather, sp_reduce_scatter, sp_split, sp_gather)
