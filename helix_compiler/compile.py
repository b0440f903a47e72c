"""``helix_compile``: compile a model and return this rank's pipeline module (under torchrun).

The one place that joins the compiler (``compile_program`` -> ``lower_program``) and the
runtime (``HelixPipeline`` over a ``Transport``): the runtime itself never imports the
compiler. Everything that can be rejected is rejected here, before any step's message.
"""

from __future__ import annotations

import torch

from .errors import HelixError
from .lowering.stage_program import lower_program
from .program import compile_program
from .runtime.pipeline import HelixPipeline


def helix_compile(model: torch.nn.Module, pp_size: int, seq_len: int, *, num_microbatches: int | None = None,
                  num_folds: int = 2, micro_batch_size: int = 1, loss_fn=None, recompute: str = "without_attention",
                  mlp_chunks: int | None = None, schedule: str = "helix", head_stage: int | str | None = None,
                  virtual_stages: int | None = None, timeout: float = 60.0, check_batch: bool = True,
                  hooks=(), record_trace: bool = False, transport=None, example_inputs=None,
                  loss_output: int | str | None = None, inputs: tuple[str, ...] = (),
                  loss_reduction: str = "auto", document_lengths: tuple[int, ...] | None = None,
                  mesh=None) -> HelixPipeline:
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
    document lengths, for the cost model and placement. ``mesh``: a ``DeviceMesh`` whose
    dimensions are named ``"pp"`` and optionally ``"dp"`` (torchtitan's names, any order): the
    pipeline runs over ``mesh["pp"]`` and each pipeline rank's gradients are summed over
    ``mesh["dp"]`` (each dp replica is given its own batch; the loss is the whole mesh's).
    Without it the whole world is the pipeline."""
    from .runtime.transport import Transport

    pp_group, dp_group = _mesh_groups(mesh, pp_size)
    dp_transport = Transport(group=dp_group, timeout=timeout, name="dp") if dp_group is not None else None
    if transport is None:
        transport = Transport(group=pp_group, timeout=timeout, name="pp")
    if transport.world_size != pp_size:
        raise HelixError(f"pp_size={pp_size} but the process group has {transport.world_size} ranks; "
                         f"launch with torchrun --nproc-per-node {pp_size}")
    if schedule == "helix" and num_microbatches is None:
        num_microbatches = pp_size * num_folds
    program = compile_program(model, pp_size=pp_size, seq_len=seq_len, num_microbatches=num_microbatches,
                              num_folds=num_folds if schedule == "helix" else 1, micro_batch_size=micro_batch_size,
                              recompute=recompute, mlp_chunks=mlp_chunks, schedule=schedule, head_stage=head_stage,
                              virtual_stages=virtual_stages, loss_fn=loss_fn, example_inputs=example_inputs,
                              loss_output=loss_output, inputs=inputs, loss_reduction=loss_reduction,
                              document_lengths=document_lengths)
    stages = lower_program(program)
    pipe = HelixPipeline(stages, rank=transport.rank, transport=transport, schedule=program.schedule,
                         hooks=tuple(hooks), record_trace=record_trace, check_batch=check_batch,
                         dp_transport=dp_transport)
    pipe.program = program
    pipe.check_consistent()
    return pipe


MESH_DIMS = ("pp", "dp", "tp")


def _mesh_groups(mesh, pp_size: int):
    """``(pp group or None for the world, dp group or None)`` of ``mesh``, checked."""
    if mesh is None:
        return None, None
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
    if "tp" in names and mesh["tp"].size() > 1:
        raise HelixError(f"mesh dimension 'tp' has size {mesh['tp'].size()}: tensor parallelism inside the "
                         f"stages is not implemented yet; use a mesh of 'pp' x 'dp' (tp size 1)")
    if mesh["pp"].size() != pp_size:
        raise HelixError(f"pp_size={pp_size} but mesh['pp'] has {mesh['pp'].size()} ranks; pass "
                         f"pp_size=mesh['pp'].size()")
    dp = mesh["dp"].get_group() if "dp" in names and mesh["dp"].size() > 1 else None
    return mesh["pp"].get_group(), dp
