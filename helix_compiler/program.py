"""``compile_program``: the offline compiler pipeline, no process group needed.

capture -> canonicalize attention -> tag layers -> cut around attention -> segments ->
costs (-> placement and schedule, see ``HelixProgram.schedule``). Which segments keep and
rerun what is the recompute policy table (``ir.recompute``), read by the cost model and the
lowering. Each pass run is recorded in ``HelixProgram.passes`` (name, wall time, FX node
counts before and after; ``HelixProgram.pass_report()``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import sympy
import torch

from .capture import CapturedGraph, capture
from .capture.adapters import check_model_early, is_hf_model
from .capture.export import check_example_inputs
from .config import HelixConfig
from .cost.model import segment_cost
from .errors import HelixError
from .ir.program import PassRecord, Segment, format_pass_records
from .ir.segment import B, S, SegmentSpec
from .passes.attention import canonicalize_attention
from .passes.cut import LayerCut, cut_attention
from .passes.layers import LayerInfo, tag_layers
from .passes.segment import build_segments
from .passes.token_loss import sum_token_loss

log = logging.getLogger(__name__)


@dataclass
class HelixProgram:
    config: HelixConfig
    captured: CapturedGraph
    layers: LayerInfo
    cuts: list[LayerCut]
    segments: list[Segment]
    schedule: object = None  # lowering.Schedule, filled by compile_program
    info: dict = field(default_factory=dict)
    passes: list[PassRecord] = field(default_factory=list)  # every pass compile_program ran, in order
    # loss_reduction="tokens" (resolved from "auto"): how a micro batch's counted tokens are
    # found (``passes.token_loss``); None: the step's loss is the micro batches' mean
    token_count: object = None
    # tensor_parallel > 1: the split of every split parameter and boundary value
    # (``passes.tensor_parallel.TensorParallelProgram``); the segments are the per-rank graphs
    tensor_parallel: object = None
    # schedule="auto": the search's ``tune.ScheduleChoice`` (chosen, runner-up, every candidate)
    choice: object = None
    # helix: why the head runs on ``schedule.head_stage`` (the option given, or the default rule
    # ``lowering.placement.default_head_stage`` with the element counts it compared)
    head_stage_reason: str | None = None

    def pass_report(self) -> str:
        """One line per pass: wall seconds and FX node counts before -> after."""
        return format_pass_records(self.passes)

    @property
    def specs(self) -> list[SegmentSpec]:
        return [s.spec for s in self.segments]

    @property
    def costs(self):
        return [s.cost for s in self.segments]

    def segment(self, name: str) -> Segment:
        for s in self.segments:
            if s.name == name:
                return s
        raise KeyError(f"no segment {name!r}; have {[s.name for s in self.segments]}")

    def reschedule(self, **changes) -> HelixProgram:
        """The same compiled segments under other schedule options (``schedule``,
        ``num_microbatches``, ``num_folds``, ``recompute``, ``virtual_stages``, ``head_stage``):
        a new program with a new schedule, without capturing the model again. Options that
        change the segment graphs (``pp_size``, ``seq_len``, ``micro_batch_size``,
        ``mlp_chunks``, whether MLP chunks recompute) need ``compile_program``."""
        allowed = {"schedule", "num_microbatches", "num_folds", "recompute", "virtual_stages", "head_stage"}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise HelixError(f"reschedule({', '.join(unknown)}=...): only {sorted(allowed)} can change without "
                             f"recompiling; call compile_program for the others")
        config = dataclasses.replace(self.config, **changes)
        if config.mlp_chunks and (config.recompute == "none") != (self.config.recompute == "none"):
            raise HelixError(f"reschedule(recompute={config.recompute!r}): the MLP chunks were compiled "
                             f"{'without' if self.config.recompute == 'none' else 'with'} recomputation; "
                             f"call compile_program with mlp_chunks={config.mlp_chunks} and this policy")
        record = _PassRecorder()
        record.records = [r for r in self.passes if r.name != "build_schedule"]
        record.graphs = [seg.gm for seg in self.segments]
        program = dataclasses.replace(self, config=config, schedule=None, info={}, passes=record.records,
                                      choice=None)
        with record("build_schedule") as rec:
            program.schedule = _build_schedule(program)
            rec.detail = f"{sum(len(p) for p in program.schedule.programs)} instructions (rescheduled)"
            if program.head_stage_reason:
                rec.detail += f"; head on stage {program.schedule.head_stage}"
        return program

    def tensor_parallel_plan(self, tp: int, *, vocab_parallel: bool | None = None):
        """How every parameter would be split over ``tp`` ranks inside each stage (Megatron's
        column / row layout, GQA heads split or replicated; the embedding and head by
        vocabulary when ``vocab_parallel``, by default as this program was compiled): see
        ``passes.tensor_parallel_plan``."""
        from .passes.tensor_parallel_plan import plan_tensor_parallel

        vocab = self.config.vocab_parallel if vocab_parallel is None else vocab_parallel
        return plan_tensor_parallel(self.captured.gm, tp, self.captured.user_fqn, vocab_parallel=vocab)

    def simulate(self, device: str = "H20", *, tp: int = 1, dp: int = 1, dp_shard: bool = False,
                 optimizer="auto", **kwargs):
        """One simulated iteration; the result's ``rank_memory`` / ``total_peak_memory_bytes``
        add parameters, gradients and optimizer state to the activations (``sim.memory``:
        ``tp``, ``dp``, ``dp_shard``, ``optimizer``). ``tp`` > 1 on a tp=1 program divides
        durations and bytes by tp as the schedule search does (``tune.simulate_program``)."""
        from .sim import simulate
        from .sim.memory import with_memory

        if tp > 1:
            from .tune import simulate_program

            return simulate_program(self, device=device, tp=tp, dp=dp, dp_shard=dp_shard, optimizer=optimizer,
                                    **kwargs)
        res = simulate(self.schedule, self.specs, self.costs, device=device,
                       micro_batch_size=self.config.micro_batch_size, seq_len=self.config.seq_len,
                       recompute=self.config.recompute, **kwargs)
        return with_memory(self, res, tp=tp, dp=dp, dp_shard=dp_shard, optimizer=optimizer)

    def __str__(self) -> str:
        c = self.config
        env = {B: c.micro_batch_size, S: c.seq_len}
        lines = [f"HelixProgram: {self.layers.num_layers} layers, pp_size={c.pp_size}, seq_len={c.seq_len}, "
                 f"micro_batch_size={c.micro_batch_size}, num_microbatches={c.num_microbatches}, "
                 f"num_folds={c.num_folds}, recompute={c.recompute}, schedule={c.schedule}",
                 f"{'segment':>8} {'nodes':>6} {'fwd GFLOP':>10} {'bwd GFLOP':>10} {'out MB':>8} {'saved MB':>9}  sends"]
        for seg in self.segments:
            cost = seg.cost
            n = sum(1 for x in seg.gm.graph.nodes if x.op == "call_function")
            ev = lambda e: float(sympy.sympify(e).subs(env))
            lines.append(f"{seg.name:>8} {n:>6} {ev(cost.flops_fwd) / 1e9:>10.3f} {ev(cost.flops_bwd) / 1e9:>10.3f} "
                         f"{ev(cost.out_bytes) / 2**20:>8.3f} {ev(cost.saved_bytes[c.recompute]) / 2**20:>9.3f}  "
                         f"{', '.join(seg.chain_outputs)}")
        for cut in self.cuts:
            lines.append(f"  layer {cut.layer}: pre-owner -> attention stage sends {list(cut.crossing)} "
                         f"({cut.bytes / 2**20:.3f} MB); runs {len(cut.moved)} pre-attention ops on the attention stage")
        if self.head_stage_reason and self.schedule is not None:
            lines.append(f"head on stage {self.schedule.head_stage}: {self.head_stage_reason}")
        if self.passes:
            lines += ["passes:"] + ["  " + line for line in self.pass_report().splitlines()]
        return "\n".join(lines)


def compile_program(model: torch.nn.Module, *, pp_size: int, seq_len: int, num_microbatches: int | None = None,
                    num_folds: int = 2, micro_batch_size: int = 1, recompute: str = "without_attention",
                    mlp_chunks: int | None = None, schedule: str = "helix", virtual_stages: int | None = None,
                    head_stage: int | str | None = None, example_inputs=None, loss_fn=None,
                    loss_output: int | str | None = None, inputs: tuple[str, ...] = (),
                    loss_reduction: str = "auto", document_lengths: tuple[int, ...] | None = None,
                    tensor_parallel: int = 1, sequence_parallel: bool | None = None,
                    vocab_parallel: bool | None = None, memory_limit="device",
                    tune: dict | None = None) -> HelixProgram:
    """``loss_output``: when the model returns several values (``(loss, logits)``, a dict), the
    position or key of the loss among them. ``inputs``: the model's per-token inputs beyond
    ``(input_ids, labels)``, by keyword name (``("position_ids",)`` for packed documents,
    ``("attention_mask",)`` for padding). ``loss_reduction``: see ``HelixConfig``.
    ``document_lengths``: typical packed document lengths, for the cost model.
    ``head_stage`` (helix): the loss head's stage, ``"auto"`` (the least loaded by the cost
    model), or None: ``"auto"`` when the head's own (untied) parameters hold at least half a
    mean layer's elements, else stage 0 (``lowering.placement.default_head_stage``; the reason
    is kept in ``program.head_stage_reason``).
    ``tensor_parallel``: ranks of the tensor-parallel group inside each stage; the segment
    graphs, their costs and boundary shapes are then one tp rank's (``passes.tensor_parallel``).
    ``sequence_parallel``: split the activations between the parallel regions along the
    sequence (default: whenever ``tensor_parallel > 1``; needs ``micro_batch_size=1``).
    ``vocab_parallel``: split the token embedding and the head by vocabulary rows, with a
    vocabulary-parallel cross-entropy (default: whenever ``tensor_parallel > 1``).
    ``schedule="auto"``: the schedule options are searched by simulation and the fastest
    runnable one whose peak memory per rank fits ``memory_limit`` (bytes, "device" or None) is
    compiled; ``tune``: ``tune.search_schedules`` options (``device`` preset, default "H20";
    ``tokens_per_step``, ``tp``, ``dp``, ``dp_shard``, ``optimizer``, the dimensions to
    search); the result's ``choice`` holds the table. Bad arguments raise HelixError before any tracing."""
    config = HelixConfig(pp_size=pp_size, seq_len=seq_len, num_microbatches=num_microbatches, num_folds=num_folds,
                         micro_batch_size=micro_batch_size, recompute=recompute, mlp_chunks=mlp_chunks,
                         schedule=schedule, virtual_stages=virtual_stages, head_stage=head_stage,
                         loss_output=loss_output, inputs=inputs, loss_reduction=loss_reduction,
                         document_lengths=document_lengths, tensor_parallel=tensor_parallel,
                         sequence_parallel=sequence_parallel, vocab_parallel=vocab_parallel)
    check_model_early(model, loss_fn=loss_fn, loss_output=loss_output)
    check_example_inputs(example_inputs, config.inputs)
    _check_depth_early(model, pp_size)
    record = _PassRecorder()
    with record("capture"):
        captured = capture(model, seq_len=seq_len, example_inputs=example_inputs, loss_fn=loss_fn,
                           loss_output=loss_output, inputs=config.inputs)
        record.graphs = [captured.gm]
    gm = captured.gm
    with record("canonicalize_attention"):
        canonicalize_attention(gm)
    with record("tag_layers") as rec:
        _, layers = tag_layers(gm)
        rec.detail = f"{layers.num_layers} layers"
    if pp_size > layers.num_layers:
        raise HelixError(f"pp_size={pp_size} is larger than the model's {layers.num_layers} layers; "
                         f"use pp_size <= {layers.num_layers}")
    with record("cut_attention") as rec:
        _, cuts = cut_attention(gm, to_expr=captured.to_cost_expr, seq_len=seq_len, micro_batch_size=micro_batch_size)
        rec.detail = f"{sum(len(c.moved) for c in cuts)} pre-attention ops moved to attention stages"
    with record("build_segments") as rec:
        segments = build_segments(gm, num_layers=layers.num_layers, to_expr=captured.to_cost_expr)
        record.graphs = [seg.gm for seg in segments]
        rec.detail = f"{len(segments)} segments"
    token_count = None
    if _token_weighted(config, model, loss_fn=loss_fn, loss_output=loss_output):
        with record("sum_token_loss") as rec:
            token_count = sum_token_loss(segments[-1])
            rec.detail = f"head loss -> token sum; counted where target != {token_count.ignore_index}"
    tensor_parallel_program = None
    if config.tensor_parallel > 1:
        tensor_parallel_program = _shard_tensor_parallel(record, captured, segments, config)
    if mlp_chunks is not None and mlp_chunks > 1:
        from .passes.mlp_chunk import chunk_mlp

        with record("chunk_mlp") as rec:
            for seg in segments:
                if seg.spec.kind in ("param", "final"):
                    chunk_mlp(seg.gm, num_chunks=mlp_chunks, recompute=recompute != "none")
            rec.detail = f"{mlp_chunks} chunks"
    with record("segment_cost"):
        all_params = dict(gm.named_parameters(remove_duplicate=False))
        param_bytes = {name: p.numel() * p.element_size() for name, p in all_params.items()}
        if tensor_parallel_program is not None:  # what one tp rank holds
            param_bytes = {name: _numel(tensor_parallel_program.local_shape(name, p.shape)) * p.element_size()
                           for name, p in all_params.items()}
        owned: set[int] = set()  # parameter objects already counted (a tied weight has two names)
        for seg in segments:
            mine = {n for n in seg.params if id(all_params[n]) not in owned}
            owned |= {id(all_params[n]) for n in seg.params}
            seg.cost = segment_cost(seg, to_expr=captured.to_cost_expr, owned_params=mine, param_bytes=param_bytes,
                                    document_lengths=config.document_lengths,
                                    tensor_parallel=config.tensor_parallel)
    program = HelixProgram(config=config, captured=captured, layers=layers, cuts=cuts, segments=segments,
                           passes=record.records, token_count=token_count,
                           tensor_parallel=tensor_parallel_program)
    if config.schedule == "auto":  # search the schedules on the compiled segments (tune.py)
        from .tune import choose_program

        return choose_program(program, memory_limit=memory_limit, **(tune or {}))
    with record("build_schedule") as rec:
        program.schedule = _build_schedule(program)
        if program.schedule is not None:
            rec.detail = f"{sum(len(p) for p in program.schedule.programs)} instructions"
            if program.head_stage_reason:
                rec.detail += f"; head on stage {program.schedule.head_stage}"
    return program


def _shard_tensor_parallel(record, captured, segments, config: HelixConfig):
    from .passes.tensor_parallel import shard_segments
    from .passes.tensor_parallel_plan import plan_tensor_parallel

    tp = config.tensor_parallel
    with record("shard_tensor_parallel") as rec:
        plan = plan_tensor_parallel(captured.gm, tp, captured.user_fqn, vocab_parallel=config.vocab_parallel)
        result = shard_segments(segments, tp=tp, plan=plan, user_fqn=captured.user_fqn,
                                to_expr=captured.to_cost_expr, sequence_parallel=config.sequence_parallel,
                                params=dict(captured.gm.named_parameters(remove_duplicate=False)),
                                vocab_parallel=config.vocab_parallel)
        modes = [m for m, on in (("sequence", result.sequence_parallel), ("vocabulary", result.vocab_parallel)) if on]
        rec.detail = (f"tp={tp}{' with ' + ' and '.join(modes) + ' parallelism' if modes else ''}: "
                      f"{len(result.param_shards)} parameters split, {result.collectives} collectives inserted, "
                      f"{len(result.partial_grads)} gradients summed over tp")
    return result


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class _Note:
    detail = ""


class _PassRecorder:
    """``with record(name): ...`` times one pass and appends its :class:`PassRecord`; node
    counts are over ``graphs`` (the captured graph, then the segment graphs), which the pass
    may replace inside the block."""

    def __init__(self) -> None:
        self.records: list[PassRecord] = []
        self.graphs: list = []

    def nodes(self) -> int:
        return sum(len(g.graph.nodes) for g in self.graphs)

    @contextlib.contextmanager
    def __call__(self, name: str):
        before, note, t0, c0 = self.nodes(), _Note(), time.perf_counter(), time.process_time()
        yield note
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.records.append(PassRecord(name, wall, before, self.nodes(), note.detail, cpu))
        log.debug("pass %s", self.records[-1])


def _token_weighted(config: HelixConfig, model, *, loss_fn, loss_output) -> bool:
    """Resolve ``loss_reduction``: "auto" is "tokens" for a Hugging Face causal LM scored by its
    own loss (a token mean), else "micro_batch_mean"."""
    if config.loss_reduction == "auto":
        return is_hf_model(model) and loss_fn is None and loss_output is None
    return config.loss_reduction == "tokens"


def _check_depth_early(model: torch.nn.Module, pp_size: int) -> None:
    """pp_size against the blocks of the model's layer ModuleList, before any tracing (the
    exact layer count, from the attentions found, is checked again after tagging)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if lists:
        depth = max(len(m) for m in lists)
        if pp_size > depth:
            raise HelixError(f"pp_size={pp_size} is larger than the model's {depth} layers; "
                             f"use pp_size <= {depth}")


def _build_schedule(program: HelixProgram):
    try:
        from .lowering.build import build_schedule
    except ImportError:  # the schedules module is optional while it is being built
        return None
    c = program.config
    head_stage, program.head_stage_reason = c.head_stage, None
    if c.schedule == "helix":  # the one place the default head placement is resolved
        if head_stage is None:
            from .lowering.placement import default_head_stage

            head_stage, program.head_stage_reason = default_head_stage(**_head_and_layer_elements(program))
        else:
            program.head_stage_reason = f"head_stage={head_stage!r} given"
    return build_schedule(program.specs, kind=c.schedule, num_stages=c.pp_size, num_microbatches=c.num_microbatches,
                          num_folds=c.num_folds, virtual_stages=c.virtual_stages, recompute=c.recompute,
                          head_stage=head_stage, costs=program.costs, micro_batch_size=c.micro_batch_size,
                          seq_len=c.seq_len)


def _head_and_layer_elements(program: HelixProgram) -> dict:
    """What ``default_head_stage`` compares: the head segment's own parameter elements (those
    no other segment uses: a head tied to the embedding has none) and the mean transformer
    layer's (the parameters under the layers' module FQNs, each tensor once; one tp rank's
    shard under tensor parallelism)."""
    params = dict(program.captured.gm.named_parameters(remove_duplicate=False))
    tp = program.tensor_parallel

    def numel(name: str) -> int:
        p = params[name]
        return _numel(tp.local_shape(name, p.shape)) if tp is not None else p.numel()

    *body, head = program.segments
    elsewhere = {id(params[n]) for seg in body for n in (*seg.params, *seg.shipped_params)}
    own = {id(params[n]): numel(n) for n in head.params if id(params[n]) not in elsewhere}
    prefixes = tuple(f"{fqn}." for fqn in program.layers.layer_fqns)
    layer = {id(p): numel(n) for n, p in params.items() if prefixes and n.startswith(prefixes)}
    if not layer:  # layer FQNs not among the parameter names: the segments between E and H
        layer = {id(params[n]): numel(n) for seg in body[1:] for n in seg.params}
    return dict(head_elements=sum(own.values()),
                mean_layer_elements=sum(layer.values()) / max(1, program.layers.num_layers))
