"""``compile_program``: the offline compiler pipeline, no process group needed.

capture -> canonicalize attention -> tag layers -> cut around attention -> segments ->
recompute boundaries -> costs (-> placement and schedule, see ``HelixProgram.schedule``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import sympy
import torch

from .capture import CapturedGraph, capture
from .config import HelixConfig
from .cost.model import segment_cost
from .errors import HelixError
from .ir.program import Segment
from .ir.segment import B, S, SegmentSpec
from .passes.attention import canonicalize_attention
from .passes.cut import LayerCut, cut_attention
from .passes.layers import LayerInfo, tag_layers
from .passes.recompute import mark_recompute
from .passes.segment import build_segments

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

    def simulate(self, device: str = "H20", **kwargs):
        from .sim import simulate

        return simulate(self.schedule, self.specs, self.costs, device=device,
                        micro_batch_size=self.config.micro_batch_size, seq_len=self.config.seq_len,
                        recompute=self.config.recompute, **kwargs)

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
        return "\n".join(lines)


def compile_program(model: torch.nn.Module, *, pp_size: int, seq_len: int, num_microbatches: int | None = None,
                    num_folds: int = 2, micro_batch_size: int = 1, recompute: str = "without_attention",
                    mlp_chunks: int | None = None, schedule: str = "helix", virtual_stages: int | None = None,
                    head_stage: int | str | None = None, example_inputs=None, loss_fn=None) -> HelixProgram:
    config = HelixConfig(pp_size=pp_size, seq_len=seq_len, num_microbatches=num_microbatches, num_folds=num_folds,
                         micro_batch_size=micro_batch_size, recompute=recompute, mlp_chunks=mlp_chunks,
                         schedule=schedule, virtual_stages=virtual_stages, head_stage=head_stage)
    _check_depth_early(model, pp_size)
    captured = capture(model, seq_len=seq_len, example_inputs=example_inputs, loss_fn=loss_fn)
    gm = captured.gm
    canonicalize_attention(gm)
    _, layers = tag_layers(gm)
    if pp_size > layers.num_layers:
        raise HelixError(f"pp_size={pp_size} is larger than the model's {layers.num_layers} layers; "
                         f"use pp_size <= {layers.num_layers}")
    _, cuts = cut_attention(gm, to_expr=captured.to_cost_expr, seq_len=seq_len, micro_batch_size=micro_batch_size)
    segments = build_segments(gm, num_layers=layers.num_layers, to_expr=captured.to_cost_expr)
    if mlp_chunks is not None and mlp_chunks > 1:
        from .passes.mlp_chunk import chunk_mlp

        for seg in segments:
            if seg.spec.kind in ("param", "final"):
                chunk_mlp(seg.gm, num_chunks=mlp_chunks, recompute=recompute != "none")
    mark_recompute(segments, policy=recompute)
    all_params = dict(gm.named_parameters(remove_duplicate=False))
    param_bytes = {name: p.numel() * p.element_size() for name, p in all_params.items()}
    owned: set[int] = set()  # parameter objects already counted (a tied weight has two names)
    for seg in segments:
        mine = {n for n in seg.params if id(all_params[n]) not in owned}
        owned |= {id(all_params[n]) for n in seg.params}
        seg.cost = segment_cost(seg, to_expr=captured.to_cost_expr, owned_params=mine, param_bytes=param_bytes)
    program = HelixProgram(config=config, captured=captured, layers=layers, cuts=cuts, segments=segments)
    program.schedule = _build_schedule(program)
    return program


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
    return build_schedule(program.specs, kind=c.schedule, num_stages=c.pp_size, num_microbatches=c.num_microbatches,
                          num_folds=c.num_folds, virtual_stages=c.virtual_stages, recompute=c.recompute,
                          head_stage=c.head_stage, costs=program.costs, micro_batch_size=c.micro_batch_size,
                          seq_len=c.seq_len)
