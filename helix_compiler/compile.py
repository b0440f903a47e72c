"""``helix_compile``: compile a model and return this rank's pipeline module (under torchrun).

The one place that joins the compiler (``compile_program`` -> ``lower_program``) and the
runtime (``HelixPipeline`` over a ``Transport``): the runtime itself never imports the
compiler. Everything that can be rejected is rejected here, before any step's message.
"""

from __future__ import annotations

import torch

from .errors import HelixError
from .kernels.tensor_parallel import bind_tp_group
from .lowering.stage_program import lower_program
from .program import compile_program
from .runtime.materialize import materialize_rank, rank_device
from .runtime.pipeline import HelixPipeline


def helix_compile(model: torch.nn.Module, pp_size: int, seq_len: int, *, num_microbatches: int | None = None,
                  num_folds: int = 2, micro_batch_size: int = 1, loss_fn=None, recompute: str = "without_attention",
                  mlp_chunks: int | None = None, schedule: str = "helix", head_stage: int | str | None = None,
                  virtual_stages: int | None = None, timeout: float = 60.0, check_batch: bool = True,
                  hooks=(), record_trace: bool = False, transport=None, example_inputs=None,
                  loss_output: int | str | None = None, inputs: tuple[str, ...] = (),
                  loss_reduction: str = "auto", document_lengths: tuple[int, ...] | None = None,
                  mesh=None, device: torch.device | str | None = None, init_seed: int = 0,
                  memory_limit="device", tune: dict | None = None,
                  sequence_parallel: bool | None = None, vocab_parallel: bool | None = None,
                  dp_shard: bool = False) -> HelixPipeline:
    """Compile ``model`` for ``pp_size`` pipeline ranks and return this rank's pipeline module.

    Needs an initialized process group of ``pp_size`` ranks (``torchrun``). ``timeout``
    bounds every wait and collective of the runtime. ``check_batch`` makes every step check
    that all ranks were given the same batch (one small all-reduce). ``hooks`` are called
    as ``hook(instr, start, end)`` after every instruction (timing, tracing). ``loss_output``:
    the position or key of the loss when the model returns several values. ``inputs``: the
    model's per-token inputs beyond ``(input_ids, labels)`` (``("position_ids",)`` for packed
    documents, ``("attention_mask",)`` for right padding), then passed as ``pipe(ids, labels,
    position_ids=...)``. ``loss_reduction``: "tokens" (the mean over the step's counted tokens;
    the default for Hugging Face causal LMs), "micro_batch_mean" (the mean of the micro
    batches' losses; the default otherwise), or "auto". ``document_lengths``: typical packed
    document lengths, for the cost model and placement. ``head_stage``: see ``compile_program``
    (default: off stage 0 for a large untied head). ``mesh``: a ``DeviceMesh`` whose
    dimensions are named ``"pp"`` and optionally ``"dp"`` and ``"tp"`` (torchtitan's names, any
    order): the pipeline runs over ``mesh["pp"]``, each stage's layers are split over
    ``mesh["tp"]`` (Megatron's column/row layout, ``passes.tensor_parallel``; the tp ranks of a
    stage are given the same batch; ``sequence_parallel``, on by default with tp, splits the
    activations between the parallel regions along the sequence; ``vocab_parallel``, on by
    default with tp, splits the embedding and head by vocabulary rows) and each pipeline rank's
    gradients are summed over
    ``mesh["dp"]`` (each dp replica is given its own batch; the loss is the whole mesh's).
    ``dp_shard=True`` also shards each pipeline rank's parameters and gradients over
    ``mesh["dp"]`` between steps (ZeRO-3 / FSDP2 style, ``runtime.dp_shard``): ``pipe.parameters()``
    are ``Shard(0)`` DTensors, all-gathered once per call and reduce-scattered as they are final.
    Without it the whole world is the pipeline. ``device``: where this rank's parameters and
    buffers live (default: the transport's device, the rank's CUDA device under NCCL, else
    CPU). A model built under ``torch.device("meta")`` is materialized per rank: only the
    tensors this rank owns are allocated, initialized by the model's own init under per-module
    seeds from ``init_seed`` (``runtime.materialize``); then load weights with
    ``pipe.load_state_dict``, ``load_pretrained`` or DCP. ``schedule="auto"`` with
    ``memory_limit`` and ``tune``: see ``compile_program`` (only runnable schedules are chosen;
    every rank's search gives the same choice, kept in ``pipe.program.choice``)."""
    from .runtime.transport import Transport

    pp_group, dp_group, tp_group = _mesh_groups(mesh, pp_size)
    if dp_shard:
        _check_dp_shard(mesh, dp_group)
    dp_transport = Transport(group=dp_group, timeout=timeout, name="dp") if dp_group is not None else None
    tp_transport = Transport(group=tp_group, timeout=timeout, name="tp") if tp_group is not None else None
    tp = tp_transport.world_size if tp_transport is not None else 1
    if transport is None:
        transport = Transport(group=pp_group, timeout=timeout, name="pp")
    if transport.world_size != pp_size:
        raise HelixError(f"pp_size={pp_size} but the process group has {transport.world_size} ranks; "
                         f"launch with torchrun --nproc-per-node {pp_size}")
    if schedule == "auto" and dp_transport is not None:  # the memory search counts the dp replicas' sharing
        tune = {"dp": dp_transport.world_size, **(tune or {})}
    if schedule in ("helix", "auto") and num_microbatches is None:
        num_microbatches = pp_size * num_folds
    program = compile_program(model, pp_size=pp_size, seq_len=seq_len, num_microbatches=num_microbatches,
                              num_folds=num_folds if schedule in ("helix", "auto") else 1,
                              micro_batch_size=micro_batch_size, memory_limit=memory_limit, tune=tune,
                              recompute=recompute, mlp_chunks=mlp_chunks, schedule=schedule, head_stage=head_stage,
                              virtual_stages=virtual_stages, loss_fn=loss_fn, example_inputs=example_inputs,
                              loss_output=loss_output, inputs=inputs, loss_reduction=loss_reduction,
                              document_lengths=document_lengths, tensor_parallel=tp,
                              sequence_parallel=sequence_parallel, vocab_parallel=vocab_parallel)
    stages = lower_program(program, tp_rank=tp_transport.rank if tp_transport is not None else 0)
    if program.tensor_parallel is not None:
        bind_tp_group(program.tensor_parallel.group_key, tp_group)
    stages = materialize_rank(stages, transport.rank, model, device=rank_device(device, transport),
                              seed=init_seed)
    pipe = HelixPipeline(stages, rank=transport.rank, transport=transport, schedule=program.schedule,
                         hooks=tuple(hooks), record_trace=record_trace, check_batch=check_batch,
                         dp_transport=dp_transport, tp_transport=tp_transport, dp_shard=dp_shard,
                         dp_mesh=mesh["dp"] if dp_shard else None)
    pipe.program = program
    pipe.check_consistent()
    return pipe


MESH_DIMS = ("pp", "dp", "tp")


def _check_dp_shard(mesh, dp_group) -> None:
    if dp_group is None:
        dims = tuple(mesh.mesh_dim_names or ()) if mesh is not None else ()
        raise HelixError(f"dp_shard=True shards parameters over the data-parallel replicas, but "
                         f"{'no mesh was given' if mesh is None else f'the mesh dimensions {dims} have no dp of size > 1'}"
                         f"; pass mesh=init_device_mesh(..., mesh_dim_names=('dp', 'pp')) with dp > 1, "
                         f"or dp_shard=False")


def _mesh_groups(mesh, pp_size: int):
    """``(pp group or None for the world, dp group or None, tp group or None)`` of ``mesh``,
    checked."""
    if mesh is None:
        return None, None, None
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise HelixError(f"mesh={mesh!r} must be a torch.distributed.device_mesh.DeviceMesh with dimensions "
                         f"named 'pp' (and optionally 'dp'), e.g. init_device_mesh('cpu', (2, 2), "
                         f"mesh_dim_names=('dp', 'pp'))")
    names = tuple(mesh.mesh_dim_names or ())
    unknown = [n for n in names if n not in MESH_DIMS]
    if "pp" not in names or unknown or len(set(names)) != len(names):
        raise HelixError(f"mesh dimensions {names}: name them from {list(MESH_DIMS)}, each once, with 'pp' "
                         f"among them (torchtitan's names)")
    if mesh["pp"].size() != pp_size:
        raise HelixError(f"pp_size={pp_size} but mesh['pp'] has {mesh['pp'].size()} ranks; pass "
                         f"pp_size=mesh['pp'].size()")
    dp = mesh["dp"].get_group() if "dp" in names and mesh["dp"].size() > 1 else None
    tp = mesh["tp"].get_group() if "tp" in names and mesh["tp"].size() > 1 else None
    return mesh["pp"].get_group(), dp, tp
