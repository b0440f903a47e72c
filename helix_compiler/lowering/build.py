"""``build_schedule``: placement + order + communication + recompute + frees, validated."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ScheduleError
from ..ir.schedule import SCHEDULE_KINDS, Schedule
from ..ir.segment import POLICIES, SegmentCost, SegmentSpec, chain_specs
from .baselines import gpipe_schedule, interleaved_schedule, one_f_one_b_schedule, zb1p_schedule
from .comm import insert_communication
from .frees import insert_frees
from .helix_schedule import helix_schedule
from .placement import choose_head_stage
from .recompute import insert_recompute
from .validate import validate_schedule


def compute_schedule(num_layers: int, *, kind: str, num_stages: int, num_microbatches: int,
                     num_folds: int = 2, virtual_stages: int | None = None,
                     head_stage: int | None = None) -> Schedule:
    """The compute-only order (F/B or F/I/W) of a schedule kind, before any lowering step."""
    if kind not in SCHEDULE_KINDS:
        raise ScheduleError(f"schedule kind {kind!r} is not one of {SCHEDULE_KINDS}")
    if kind != "interleaved" and virtual_stages not in (None, 1):
        raise ScheduleError(f"virtual_stages={virtual_stages} only applies to kind='interleaved' "
                            f"(got kind={kind!r}); leave it None")
    if kind != "helix" and head_stage is not None:
        raise ScheduleError(f"head_stage={head_stage} only applies to kind='helix' (layer-wise "
                            f"schedules run the head on the last stage); leave it None")
    if kind == "helix":
        return helix_schedule(num_layers, num_stages, num_microbatches, num_folds,
                              head_stage=head_stage)
    if kind == "gpipe":
        return gpipe_schedule(num_layers, num_stages, num_microbatches)
    if kind == "1f1b":
        return one_f_one_b_schedule(num_layers, num_stages, num_microbatches)
    if kind == "zb1p":
        return zb1p_schedule(num_layers, num_stages, num_microbatches)
    return interleaved_schedule(num_layers, num_stages, num_microbatches, virtual_stages)


def lower_schedule(schedule: Schedule, *, recompute: str = "without_attention") -> Schedule:
    """The lowering steps in order: recompute instructions, communication, frees."""
    return insert_frees(insert_communication(insert_recompute(schedule, recompute)))


def build_schedule(specs: Sequence[SegmentSpec], *, kind: str, num_stages: int,
                   num_microbatches: int, num_folds: int = 2, virtual_stages: int | None = None,
                   head_stage: int | str | None = None, recompute: str = "without_attention",
                   costs: Sequence[SegmentCost] | None = None, micro_batch_size: int = 1,
                   seq_len: int | None = None, validate: bool = True) -> Schedule:
    """Build, lower and validate a schedule over the segment chain ``specs``.

    ``kind``: ``"helix" | "gpipe" | "1f1b" | "interleaved" | "zb1p"``. ``num_folds`` only
    applies to helix (layer-wise schedules use one fold). ``head_stage`` (helix only): a stage
    index, or ``"auto"`` for the stage the cost model (``costs`` at ``micro_batch_size``,
    ``seq_len``) says is least loaded. ``recompute``: one of ``POLICIES``.
    """
    specs = list(specs)
    if len(specs) < 4 or (len(specs) - 2) % 2:
        raise ScheduleError(f"a segment chain has 2L+2 segments (E, A1, P1, ..., AL, PL, H); "
                            f"got {len(specs)}")
    num_layers = (len(specs) - 2) // 2
    if specs != chain_specs(num_layers):
        raise ScheduleError(
            f"segments {[s.name for s in specs]} are not the chain E, A1, P1, ..., "
            f"A{num_layers}, P{num_layers}, H of ir.segment.chain_specs({num_layers})")
    if recompute not in POLICIES:
        raise ScheduleError(f"recompute={recompute!r} is not one of {POLICIES}")
    if head_stage == "auto":
        if kind != "helix":
            head_stage = None
        else:
            if costs is None or seq_len is None:
                raise ScheduleError("head_stage='auto' needs costs= and seq_len= to ask the cost "
                                    "model which stage is least loaded")
            head_stage = choose_head_stage(specs, costs, num_stages=num_stages,
                                           num_microbatches=num_microbatches,
                                           num_folds=num_folds, micro_batch_size=micro_batch_size,
                                           seq_len=seq_len)
    elif head_stage is not None and not isinstance(head_stage, int):
        raise ScheduleError(f"head_stage={head_stage!r} must be a stage index, 'auto' or None")
    sched = compute_schedule(num_layers, kind=kind, num_stages=num_stages,
                             num_microbatches=num_microbatches,
                             num_folds=num_folds if kind == "helix" else 1,
                             virtual_stages=virtual_stages, head_stage=head_stage)
    sched = lower_schedule(sched, recompute=recompute)
    if validate:
        validate_schedule(sched)
    return sched
