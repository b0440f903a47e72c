"""``schedule="auto"``: pick the fastest schedule that fits, by simulation.

No peer chooses a pipeline schedule for the user; with a cost model and a simulator we can.
:func:`search_schedules` takes one compiled program (captured once, segments and costs built
once) and searches

* schedule kinds: helix with ``F`` in ``folds``, GPipe, 1F1B, interleaved 1F1B with every
  valid virtual stage count (one layer per virtual stage included), ZB1P (split backward: the
  runtime does not run its I/W instructions, so it is simulated, marked "not runnable" and
  never chosen when ``runnable_only``);
* recompute policies (the same options for every kind);
* MLP chunk counts: each count is one derived program (``chunk_mlp`` over copies of the
  parameter segments, costs recomputed), built once and shared by all its candidates. Under
  ``recompute="none"`` chunks run under plain autograd and cost and keep exactly what the
  unchunked MLP does in this model (HELIXPIPE.md 4: fragmentation only), so only the other
  policies get chunked candidates;
* helix head placement: stage 0 or the stage the cost model finds least loaded;
* the micro batch count at a fixed number of tokens per step: ``M`` micro batches of
  ``b = tokens_per_step / (seq_len * M)`` sequences (the costs are symbolic in ``b``).

Each candidate is simulated on the device preset (``sim.simulate_times`` with the preset's
links); its peak memory per rank is ``sim.memory`` (activations + parameters + gradients +
optimizer state, under ``tp`` / ``dp`` / ``dp_shard``); candidates above ``memory_limit`` do
not fit. The fastest fitting (runnable) candidate is chosen; the runner-up is the next one.

Speed (the search is exact, not a heuristic): the busiest rank's compute time is a lower
bound of a candidate's iteration time, and it costs a sum over the compute-only schedule
(no lowering, no simulation). Candidates are simulated in the order of that bound; once the
bound reaches the runner-up's simulated time, no remaining candidate can be chosen or be the
runner-up, and they are listed as "not simulated" with their bound (``exhaustive=True``
simulates them all). Schedules are built without the offline validator; the chosen one is
built again through ``HelixProgram.reschedule``, which validates it.

Under ``tp`` > 1 (a program compiled for tp=1) every per-rank duration and byte count is
divided by ``tp``: ideal tensor parallelism with sequence parallelism, its collectives not
modelled (the compiled tensor-parallel program's own costs will replace this).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch.fx as fx

from .cost.devices import DeviceSpec, get_device
from .errors import HelixError
from .ir.recompute import recompute_part
from .ir.segment import POLICIES
from .sim.costs import OpTimes, op_times
from .sim.engine import SimResult, Topology, simulate_times
from .sim.memory import MemoryModel, RankMemory, attach_memory

log = logging.getLogger(__name__)

KINDS = ("helix", "gpipe", "1f1b", "interleaved", "zb1p")
TOKENS_PER_MLP_CHUNK = 8192  # the default chunked candidate: MLP chunks of about this many tokens


@dataclass(frozen=True)
class Candidate:
    """One point of the search space: the options ``compile_program`` takes."""

    schedule: str
    num_microbatches: int
    micro_batch_size: int
    recompute: str
    num_folds: int = 1
    virtual_stages: int | None = None
    head_stage: int | None = None  # helix: the head's stage (0: with the embedding); None for layer-wise kinds
    mlp_chunks: int | None = None

    def label(self) -> str:
        parts = [self.schedule]
        if self.schedule == "helix":
            parts.append(f"F={self.num_folds}")
        if self.virtual_stages:
            parts.append(f"v={self.virtual_stages}")
        parts.append(f"M={self.num_microbatches}")
        if self.micro_batch_size != 1:
            parts.append(f"b={self.micro_batch_size}")
        parts.append(f"rc={self.recompute}")
        if self.head_stage:
            parts.append(f"head={self.head_stage}")
        if self.mlp_chunks:
            parts.append(f"mlp={self.mlp_chunks}")
        return " ".join(parts)

    def options(self) -> dict:
        """The keyword arguments of ``compile_program`` / ``helix_compile`` for this candidate."""
        return dict(schedule=self.schedule, num_microbatches=self.num_microbatches,
                    micro_batch_size=self.micro_batch_size, recompute=self.recompute,
                    num_folds=self.num_folds, virtual_stages=self.virtual_stages,
                    head_stage=0 if self.schedule == "helix" and self.head_stage is None else self.head_stage,
                    mlp_chunks=self.mlp_chunks)  # helix: an explicit stage (None would be the default rule)


@dataclass(frozen=True)
class CandidateResult:
    candidate: Candidate
    runnable: bool
    lower_bound: float  # the busiest rank's compute time, seconds
    iteration_time: float | None = None  # None: not simulated (see the module docstring)
    bubble_ratio: float | None = None
    throughput: float | None = None  # tokens per second
    memory: tuple[RankMemory, ...] | None = None
    fits: bool | None = None
    memory_bound: float | None = None  # not simulated: a lower bound of its peak above the limit

    @property
    def simulated(self) -> bool:
        return self.iteration_time is not None

    @property
    def peak_memory(self) -> float | None:
        """The largest per-rank total peak, bytes."""
        return None if self.memory is None else max(m.total for m in self.memory)

    @property
    def peak_memory_per_rank(self) -> tuple[float, ...] | None:
        return None if self.memory is None else tuple(m.total for m in self.memory)


@dataclass
class ScheduleChoice:
    """What the search found: the chosen candidate, the runner-up, and every candidate
    (simulated ones ranked by iteration time, then the pruned ones by their bound)."""

    chosen: CandidateResult | None
    runner_up: CandidateResult | None
    candidates: tuple[CandidateResult, ...]
    device: str
    memory_limit: float | None
    tokens_per_step: int
    seconds: float  # wall time of the search
    scale: dict = field(default_factory=dict)  # tp, dp, dp_shard, optimizer

    @property
    def simulated(self) -> list[CandidateResult]:
        return [c for c in self.candidates if c.simulated]

    def table(self, top: int | None = None) -> str:
        gb = 1e9
        lim = "none" if self.memory_limit is None else f"{self.memory_limit / gb:.1f} GB"
        head = (f"schedule search on {self.device}: {len(self.candidates)} candidates, {len(self.simulated)} "
                f"simulated in {self.seconds:.2f} s; {self.tokens_per_step} tokens per step; memory limit {lim} "
                f"per rank ({', '.join(f'{k}={v}' for k, v in self.scale.items())})")
        lines = [head, f"{'':2}{'#':>3}  {'candidate':<58} {'iteration s':>11} {'tokens/s':>10} {'bubble':>7} "
                       f"{'peak GB max/min':>16} {'fits':>5}  runnable"]
        sims = self.simulated
        shown = sims if top is None else sims[:top]
        for k, c in enumerate(shown, 1):
            mark = "*" if c is self.chosen else ("2" if c is self.runner_up else "")
            per = c.peak_memory_per_rank
            lines.append(f"{mark:>2}{k:>3}  {c.candidate.label():<58} {c.iteration_time:>11.4g} "
                         f"{c.throughput:>10.4g} {c.bubble_ratio:>7.3f} "
                         f"{f'{max(per) / gb:.1f}/{min(per) / gb:.1f}':>16} {'yes' if c.fits else 'no':>5}  "
                         f"{'yes' if c.runnable else 'no (split backward)'}")
        if len(shown) < len(sims):
            lines.append(f"  ... {len(sims) - len(shown)} more simulated candidates")
        slow = [c for c in self.candidates if not c.simulated and c.memory_bound is None]
        big = [c for c in self.candidates if not c.simulated and c.memory_bound is not None]
        if slow:
            lines.append(f"  {len(slow)} candidates not simulated: their busiest rank alone computes "
                         f">= {min(c.lower_bound for c in slow):.4g} s, longer than the runner-up's whole "
                         f"iteration")
        if big:
            lines.append(f"  {len(big)} candidates not simulated: over the memory limit before any backward "
                         f"(stashes held at a rank's first backward + parameters and optimizer state >= "
                         f"{min(c.memory_bound for c in big) / gb:.1f} GB)")
        if slow or big:
            lines.append("  (exhaustive=True / helix tune --all simulates every candidate)")
        if self.chosen is not None:
            lines.append(f"chosen: {self.chosen.candidate.label()}"
                         + (f"; runner-up: {self.runner_up.candidate.label()} "
                            f"({self.runner_up.iteration_time / self.chosen.iteration_time:.3f}x the time)"
                            if self.runner_up else ""))
        else:
            lines.append("chosen: none (no runnable candidate fits the memory limit)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def write_picture(self, path, *, top: int = 30):
        """Bars of iteration time and peak memory per rank (max over ranks) of the ``top``
        fastest simulated candidates, the memory limit as a line; PNG (or any matplotlib
        format by suffix)."""
        from .sim.plot import _plt

        plt = _plt()
        rows = self.simulated[:top][::-1]
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(14, 0.32 * len(rows) + 1.6), sharey=True)
        labels = [c.candidate.label() for c in rows]
        colors = ["#2b8a3e" if c.fits and c.runnable else "#e8590c" if c.fits else "#adb5bd" for c in rows]
        ax_t.barh(labels, [c.iteration_time for c in rows], color=colors)
        ax_t.set_xlabel("iteration time (s)")
        ax_m.barh(labels, [c.peak_memory / 1e9 for c in rows], color=colors)
        if self.memory_limit is not None:
            ax_m.axvline(self.memory_limit / 1e9, color="#c92a2a", linestyle="--", label="memory limit")
            ax_m.legend(loc="lower right")
        ax_m.set_xlabel("peak memory per rank, max over ranks (GB)")
        for ax in (ax_t, ax_m):
            ax.tick_params(axis="y", labelsize=7)
        chosen = self.chosen.candidate.label() if self.chosen else "none fits"
        fig.suptitle(f"schedule search on {self.device}: chosen {chosen} (green: fits and runs; orange: fits, "
                     f"not runnable; grey: over the limit)", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


# ---------------------------------------------------------------------------------- search
def resolve_memory_limit(memory_limit, device: DeviceSpec) -> float | None:
    """Bytes per rank from ``memory_limit``: a number of bytes, ``"device"`` (the device's
    memory) or None (no limit)."""
    if memory_limit is None:
        return None
    if memory_limit == "device":
        return device.memory_bytes if 0 < device.memory_bytes < math.inf else None
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, (int, float)) or not memory_limit > 0:
        raise HelixError(f"memory_limit={memory_limit!r} must be bytes per rank (> 0), 'device' (the device "
                         f"preset's memory) or None (no limit)")
    return float(memory_limit)


def search_schedules(program, *, device: str | DeviceSpec = "H20", memory_limit="device",
                     tokens_per_step: int | None = None, tp: int = 1, dp: int = 1, dp_shard: bool = False,
                     optimizer="auto", schedules: Sequence[str] = KINDS, folds: Sequence[int] = (1, 2),
                     recompute: Sequence[str] = POLICIES, mlp_chunks: Sequence[int | None] | None = None,
                     head_stages: Sequence = (0, "auto"), virtual_stages: Sequence[int] | None = None,
                     num_microbatches: Sequence[int] | None = None, runnable_only: bool = True,
                     exhaustive: bool = False, stages_per_node: int = 1,
                     memory_model: MemoryModel | None = None) -> ScheduleChoice:
    """Search the schedule options of ``program`` (a compiled ``HelixProgram``) by simulation;
    see the module docstring. ``tokens_per_step`` defaults to the program's
    ``num_microbatches * micro_batch_size * seq_len``; ``mlp_chunks`` to ``(None, k)`` with
    chunks of about 8192 tokens; ``virtual_stages`` / ``num_microbatches`` restrict those
    dimensions (default: every valid value). ``memory_model``: a ready
    :class:`~helix_compiler.sim.memory.MemoryModel` (e.g. ``MemoryModel.from_segments`` for
    analytic costs) instead of one built from the program with ``tp``, ``dp``, ``dp_shard``,
    ``optimizer``."""
    t0 = time.perf_counter()
    dev = get_device(device)
    limit = resolve_memory_limit(memory_limit, dev)
    cfg = program.config
    p, s = cfg.pp_size, cfg.seq_len
    L = program.layers.num_layers
    tokens = tokens_per_step if tokens_per_step is not None else cfg.num_microbatches * cfg.micro_batch_size * s
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0 or tokens % s:
        raise HelixError(f"tokens_per_step={tokens!r} must be a positive multiple of seq_len={s} (whole sequences "
                         f"per step), e.g. {max(1, (tokens or s) // s) * s if isinstance(tokens, int) else 16 * s}")
    _check_choices("schedules", schedules, KINDS)
    _check_choices("recompute", recompute, POLICIES)
    sequences = tokens // s
    pairs = [(m, sequences // m) for m in range(1, sequences + 1) if sequences % m == 0
             and (num_microbatches is None or m in num_microbatches) and _batch_allowed(cfg, sequences // m)]
    if not pairs:
        raise HelixError(f"num_microbatches={tuple(num_microbatches or ())}: none divides the {sequences} sequences "
                         f"of tokens_per_step={tokens}; use divisors of {sequences}")
    compiled_tp = int(getattr(cfg, "tensor_parallel", 1) or 1)
    scale = 1 if compiled_tp > 1 else tp  # ideal tensor parallelism for a tp=1 program (module docstring)
    memory = memory_model or MemoryModel(program, tp=tp, dp=dp, dp_shard=dp_shard, optimizer=optimizer)
    variants = _mlp_variants(program, mlp_chunks, recompute)
    topo = Topology(dev, stages_per_node)
    ctx = _Context(program, dev, scale)

    results: list[CandidateResult] = []
    pending: list[tuple[float, Candidate, tuple]] = []
    for kind, m, b, f, v in _structures(schedules, pairs, folds, virtual_stages, p, L):
        for k, variant in variants.items():
            for rc in recompute:
                if not _policy_fits_chunks(variant.config, rc):
                    continue
                heads = [None]
                if kind == "helix":
                    heads = sorted({ctx.head_stage(variant, k, h, m, f, b, rc) for h in head_stages})
                for h in heads:
                    ckey = (kind, m, f, v, h)
                    pending.append((ctx.lower_bound(ckey, variant, k, b, rc), Candidate(kind, m, b, rc, f, v, h, k),
                                    ckey))
    if not pending:
        raise HelixError(f"schedule search: no candidate for pp_size={p}, {L} layers, {sequences} sequences per "
                         f"step and schedules={tuple(schedules)}; allow more schedule kinds or change "
                         f"tokens_per_step")
    pending.sort(key=lambda x: (x[0], x[1].label()))
    fitting: list[float] = []  # simulated times of eligible candidates that fit, sorted

    for lb, cand, ckey in pending:
        runnable = ctx.runnable(ckey)
        if not exhaustive and len(fitting) >= 2 and lb > fitting[1]:  # (ties are simulated: exact order)
            results.append(CandidateResult(cand, runnable, lb))
            continue
        if not exhaustive and limit is not None:
            mb = ctx.memory_bound(ckey, variants[cand.mlp_chunks], cand.mlp_chunks, cand.micro_batch_size,
                                  cand.recompute, memory, scale > 1)
            if mb > limit:
                results.append(CandidateResult(cand, runnable, lb, memory_bound=mb, fits=False))
                continue
        times = ctx.times(variants[cand.mlp_chunks], cand.mlp_chunks, cand.micro_batch_size, cand.recompute)
        sched = ctx.lowered(ckey, cand.recompute)
        res = simulate_times(sched, times, link=topo, tokens_per_iteration=tokens, device_name=dev.name)
        mem = tuple(memory.per_rank(sched, res.peak_memory_bytes, per_tp_rank=scale > 1))
        fits = limit is None or max(x.total for x in mem) <= limit
        results.append(CandidateResult(cand, runnable, lb, res.iteration_time, res.bubble_ratio, res.throughput,
                                       mem, fits))
        if fits and (runnable or not runnable_only):
            fitting.append(res.iteration_time)
            fitting.sort()
    sims = sorted((r for r in results if r.simulated), key=lambda r: (r.iteration_time, r.candidate.label()))
    rest = sorted((r for r in results if not r.simulated), key=lambda r: (r.lower_bound, r.candidate.label()))
    eligible = [r for r in sims if r.fits and (r.runnable or not runnable_only)]
    choice = ScheduleChoice(eligible[0] if eligible else None, eligible[1] if len(eligible) > 1 else None,
                            tuple(sims + rest), dev.name, limit, tokens, time.perf_counter() - t0,
                            dict(tp=memory.tp, dp=memory.dp, dp_shard=memory.dp_shard,
                                 optimizer=memory.optimizer.name))
    if choice.chosen is not None:
        ru = choice.runner_up
        log.info("schedule='auto' on %s: chose %s (%.4g s per step, peak %.2f GB per rank); runner-up %s; "
                 "%d of %d candidates simulated in %.2f s", dev.name, choice.chosen.candidate.label(),
                 choice.chosen.iteration_time, choice.chosen.peak_memory / 1e9,
                 f"{ru.candidate.label()} ({ru.iteration_time:.4g} s)" if ru else "none",
                 len(sims), len(results), choice.seconds)
    return choice


def choose_program(program, **search):
    """The program rescheduled (and, for MLP chunks, rebuilt from its segments) to the
    search's choice, with ``program.choice`` the :class:`ScheduleChoice`. Raises HelixError
    when no runnable candidate fits the memory limit, naming the smallest one."""
    if not search.pop("runnable_only", True):
        raise HelixError("choose_program compiles a runnable schedule: runnable_only=False applies to "
                         "search_schedules (the table) only")
    choice = search_schedules(program, runnable_only=True, **search)
    if choice.chosen is None:
        sims = [c for c in choice.simulated if c.runnable]
        least = min(sims, key=lambda c: c.peak_memory) if sims else None
        bounds = [c.memory_bound for c in choice.candidates if c.memory_bound is not None]
        hint = (f"; the smallest is {least.candidate.label()} at {least.peak_memory / 1e9:.2f} GB per rank"
                if least else f"; every candidate needs at least {min(bounds) / 1e9:.2f} GB per rank"
                if bounds else "")
        limit = "None" if choice.memory_limit is None else f"{choice.memory_limit / 1e9:.3g} GB"
        raise HelixError(f"schedule='auto': no runnable candidate fits memory_limit={limit} per rank on "
                         f"{choice.device}{hint}; use more pipeline stages, tp / dp_shard, a larger memory_limit, "
                         f"a shorter sequence or runnable schedule kinds")
    return build_choice(program, choice)


def build_choice(program, choice: ScheduleChoice):
    """The program for ``choice.chosen`` (validated), carrying ``choice``."""
    c = choice.chosen.candidate
    base = program
    if c.mlp_chunks and c.mlp_chunks != program.config.mlp_chunks:
        base = with_mlp_chunks(program, c.mlp_chunks, recompute=c.recompute != "none")
    out = base.reschedule(schedule=c.schedule, num_microbatches=c.num_microbatches, num_folds=c.num_folds,
                          recompute=c.recompute, virtual_stages=c.virtual_stages, head_stage=c.head_stage)
    if c.micro_batch_size != out.config.micro_batch_size:  # segments are symbolic in b (dynamic batch)
        out.config = dataclasses.replace(out.config, micro_batch_size=c.micro_batch_size)
    out.choice = choice
    return out


def _batch_allowed(config, b: int) -> bool:
    """Whether the program's configuration takes micro batches of ``b`` sequences (e.g.
    sequence parallelism needs one): the config's own validation decides."""
    if b == config.micro_batch_size:
        return True
    try:
        dataclasses.replace(config, micro_batch_size=b)
    except HelixError as e:
        log.info("schedule search: no micro batches of %d sequences: %s", b, e)
        return False
    return True


def _policy_fits_chunks(config, rc: str) -> bool:
    """Chunked MLPs recompute under a recomputing policy and not under "none" (as
    ``compile_program`` builds them; ``HelixProgram.reschedule`` keeps it so). Searched chunk
    counts are built recomputing: under "none" they would cost and keep exactly what the
    unchunked MLP does (module docstring)."""
    if config.mlp_chunks in (None, 1):
        return True
    return (rc == "none") == (config.recompute == "none")


def _structures(schedules, pairs, folds, virtual_stages, p: int, L: int):
    """``(kind, M, b, F, v)`` for every kind and micro batch split the schedules accept."""
    from .lowering.baselines import valid_virtual_stages

    for kind in schedules:
        for m, b in pairs:
            if kind in ("1f1b", "zb1p", "interleaved") and m < p or kind == "interleaved" and m % p:
                continue
            fold_opts = [f for f in folds if m % (p * f) == 0] if kind == "helix" else [1]
            vs = [None]
            if kind == "interleaved":
                vs = [v for v in valid_virtual_stages(L, p) if virtual_stages is None or v in virtual_stages]
            for f in fold_opts:
                for v in vs:
                    yield kind, m, b, f, v


def _check_choices(name: str, values, allowed) -> None:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise HelixError(f"{name}={tuple(values)!r}: choose from {list(allowed)}")


class _Context:
    """Caches shared by the candidates: compute-only schedules and their per-rank operation
    counts, lowered schedules, per-variant op times, head stages."""

    def __init__(self, program, device: DeviceSpec, scale: int):
        self.program, self.device, self.scale = program, device, scale
        self.specs = program.specs
        self.kinds = [sp.kind for sp in self.specs]
        self._compute: dict = {}
        self._counts: dict = {}
        self._lowered: dict = {}
        self._times: dict = {}
        self._heads: dict = {}
        self._bounds: dict = {}

    def head_stage(self, variant, k, h, m: int, f: int, b: int, rc: str) -> int:
        """``h`` as an explicit stage (0 or None: stage 0, with the embedding; a candidate never
        leaves it to ``HelixProgram``'s default rule); ``"auto"``: the stage with the least simulated
        compute without the head, ties to the lowest stage other than 0 (stage 0 also runs the
        embedding and ends the forward), as ``lowering.placement.choose_head_stage`` picks
        by FLOPs (here by the simulator's durations, which it computes anyway)."""
        if h is None or h == 0:
            return 0
        if h != "auto":
            return h
        key = (k, m, f, b, rc)
        if key not in self._heads:
            busy = self.busy(("helix", m, f, None, 0), variant, k, b, rc, skip=(len(self.specs) - 1,))
            best = min(busy)
            tol = 1e-9 * max(1.0, abs(best))
            st = next(r for r in [*range(1, len(busy)), 0] if busy[r] <= best + tol)
            self._heads[key] = st
        return self._heads[key]

    def compute(self, ckey):
        if ckey not in self._compute:
            from .lowering.build import compute_schedule

            kind, m, f, v, h = ckey
            self._compute[ckey] = compute_schedule(self.program.layers.num_layers, kind=kind,
                                                   num_stages=self.program.config.pp_size, num_microbatches=m,
                                                   num_folds=f, virtual_stages=v, head_stage=h)
        return self._compute[ckey]

    def runnable(self, ckey) -> bool:
        from .lowering.stage_program import RUNNABLE_OPS

        return all(i.op in RUNNABLE_OPS for prog in self.compute(ckey).programs for i in prog)

    def counts(self, ckey):
        """Per rank and chain segment: how many F, B, I, W run, and how many backwards
        (B or I) follow something other than their own forward (those get an R under a
        recomputing policy: ``lowering.recompute``'s rule)."""
        if ckey not in self._counts:
            sched = self.compute(ckey)
            idx = sched.seg_index
            n = len(self.specs)
            out = []
            for prog in sched.programs:
                c = {op: [0] * n for op in ("F", "B", "I", "W", "R", "F_before_B")}
                prev = None
                backward_started = False
                for i in prog:
                    if not i.is_compute:
                        continue
                    k = idx[i.seg]
                    c[i.op][k] += 1
                    backward_started |= i.op in ("B", "I")
                    if i.op == "F" and not backward_started:
                        c["F_before_B"][k] += 1
                    if i.op in ("B", "I") and not (prev is not None and prev.op == "F" and prev.seg == i.seg
                                                   and prev.mb == i.mb):
                        c["R"][k] += 1
                    prev = i
                out.append(c)
            self._counts[ckey] = out
        return self._counts[ckey]

    def times(self, variant, k, b: int, rc: str) -> OpTimes:
        key = (k, b, rc)
        if key not in self._times:
            t = op_times(variant.costs, self.device, micro_batch_size=b, seq_len=variant.config.seq_len,
                         recompute=rc, specs=self.specs)
            self._times[key] = _scaled(t, self.scale)
        return self._times[key]

    def busy(self, ckey, variant, k, b: int, rc: str, skip: Sequence[int] = ()) -> list[float]:
        """Per rank compute seconds (F, B, I, W and the R the lowering will insert), leaving out
        the chain segments in ``skip``."""
        t = self.times(variant, k, b, rc)
        on = [recompute_part(rc, kind) is not None and c not in skip for c, kind in enumerate(self.kinds)]
        keep = [c not in skip for c in range(len(self.kinds))]
        out = []
        for c in self.counts(ckey):
            x = sum(n * d for n, d, y in zip(c["F"], t.fwd, keep, strict=True) if y)
            x += sum(n * d for n, d, y in zip(c["B"], t.bwd, keep, strict=True) if y)
            x += sum(n * d for n, d, y in zip(c["I"], t.bwd_input, keep, strict=True) if y)
            x += sum(n * d for n, d, y in zip(c["W"], t.bwd_weight, keep, strict=True) if y)
            x += sum(n * d for n, d, y in zip(c["R"], t.recompute, on, strict=True) if y)
            out.append(x)
        return out

    def lower_bound(self, ckey, variant, k, b: int, rc: str) -> float:
        """The busiest rank's compute time: no schedule finishes sooner."""
        key = (ckey, k, b, rc)
        if key not in self._bounds:
            self._bounds[key] = max(self.busy(ckey, variant, k, b, rc))
        return self._bounds[key]

    def memory_bound(self, ckey, variant, k, b: int, rc: str, memory: MemoryModel, per_tp_rank: bool) -> float:
        """A lower bound of the largest per-rank peak: on every rank, the stashes of the
        forwards before its first backward are all held when that backward starts (each at
        least its policy's saved bytes less what a local input may alias), plus what the
        rank holds all step."""
        t = self.times(variant, k, b, rc)
        kept = [sv - (t.local_alias[c] if t.local_alias else 0.0) for c, sv in enumerate(t.saved_bytes)]
        acts = [sum(n * x for n, x in zip(c["F_before_B"], kept, strict=True)) for c in self.counts(ckey)]
        return max(m.total for m in memory.per_rank(self.compute(ckey), acts, per_tp_rank=per_tp_rank))

    def lowered(self, ckey, rc: str):
        key = (ckey, rc)
        if key not in self._lowered:
            from .lowering.build import lower_schedule

            self._lowered[key] = lower_schedule(self.compute(ckey), recompute=rc)
        return self._lowered[key]


def _scaled(t: OpTimes, tp: int) -> OpTimes:
    """Every duration and byte count of one stage divided over ``tp`` ranks."""
    if tp == 1:
        return t
    return OpTimes(**{f.name: tuple(x / tp for x in getattr(t, f.name)) for f in dataclasses.fields(OpTimes)})


# ------------------------------------------------------------------------------ MLP chunks
def _mlp_variants(program, mlp_chunks, recompute) -> dict:
    """``{None: program, k: program with k MLP chunks}``: one derived program per count."""
    cfg = program.config
    if cfg.mlp_chunks not in (None, 1):  # compiled with chunks: that count only (its segments)
        return {cfg.mlp_chunks: program}
    if mlp_chunks is None:
        mlp_chunks = (None, max(2, cfg.seq_len // TOKENS_PER_MLP_CHUNK))
    out = {}
    for k in mlp_chunks:
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= cfg.seq_len):
            raise HelixError(f"mlp_chunks={k!r} must be None or an int in 1..seq_len={cfg.seq_len}")
        k = None if k == 1 else k
        if k is None:
            out[None] = program
            continue
        if k in out:
            continue
        if int(getattr(cfg, "tensor_parallel", 1) or 1) > 1:
            log.info("schedule search: no MLP chunk candidates under tensor_parallel > 1")
            continue
        if all(rc == "none" for rc in recompute):
            continue
        derived = with_mlp_chunks(program, k, recompute=True)
        if derived is not None:
            out[k] = derived
    return out


def with_mlp_chunks(program, num_chunks: int, *, recompute: bool):
    """``program`` with its parameter segments' MLPs chunked (``passes.mlp_chunk``) on copies
    of their graphs (the captured model and the other segments are shared), costs rebuilt;
    None when no segment has an MLP the pass matches."""
    import warnings

    from .cost.model import segment_cost
    from .ir.program import PassRecord
    from .passes.mlp_chunk import chunk_mlp

    t0 = time.perf_counter()
    changed = False
    segments = []
    for seg in program.segments:
        if seg.spec.kind in ("param", "final"):
            gm = _copy_graph_module(seg.gm)
            with warnings.catch_warnings(), _quiet("helix_compiler.passes.mlp_chunk"):
                warnings.simplefilter("ignore")
                changed |= chunk_mlp(gm, num_chunks=num_chunks, recompute=recompute).changed
            seg = dataclasses.replace(seg, gm=gm)
        segments.append(seg)
    if not changed:
        log.info("schedule search: no MLP the chunk_mlp pass matches; no MLP chunk candidates")
        return None
    captured = program.captured
    all_params = dict(captured.gm.named_parameters(remove_duplicate=False))
    param_bytes = {name: p.numel() * p.element_size() for name, p in all_params.items()}
    owned: set[int] = set()  # as compile_program: a tied weight counts on its first segment
    for seg in segments:
        mine = {n for n in seg.params if id(all_params[n]) not in owned}
        owned |= {id(all_params[n]) for n in seg.params}
        if seg.spec.kind in ("param", "final"):
            seg.cost = segment_cost(seg, to_expr=captured.to_cost_expr, owned_params=mine, param_bytes=param_bytes,
                                    document_lengths=program.config.document_lengths)
    # chunks that recompute go with a recomputing policy (HelixProgram.reschedule checks it)
    policy = program.config.recompute
    if (policy == "none") == recompute:
        policy = "without_attention" if recompute else "none"
    config = dataclasses.replace(program.config, mlp_chunks=num_chunks, recompute=policy)
    wall = time.perf_counter() - t0
    record = PassRecord("chunk_mlp", wall, 0, 0, f"{num_chunks} chunks (derived for the schedule search)", wall)
    return dataclasses.replace(program, segments=segments, config=config, schedule=None, info={},
                               passes=[*program.passes, record])


@contextlib.contextmanager
def _quiet(name: str):
    """The pass logs each region at INFO: one line per layer per derived program is noise here."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new graph over the same parameters (node meta kept)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}), type_expr=None)
    new = fx.GraphModule(gm, graph)
    new.meta = dict(gm.meta)
    return new


def simulate_program(program, *, device: str | DeviceSpec = "H20", tp: int = 1, dp: int = 1,
                     dp_shard: bool = False, optimizer="auto", stages_per_node: int = 1) -> SimResult:
    """``program``'s own schedule simulated as the search simulates a candidate (durations and
    bytes divided by ``tp`` for a tp=1 program), with :class:`~helix_compiler.sim.memory.RankMemory`
    per rank in the result."""
    dev = get_device(device)
    cfg = program.config
    compiled_tp = int(getattr(cfg, "tensor_parallel", 1) or 1)
    scale = 1 if compiled_tp > 1 else tp
    memory = MemoryModel(program, tp=tp, dp=dp, dp_shard=dp_shard, optimizer=optimizer)
    times = _scaled(op_times(program.costs, dev, micro_batch_size=cfg.micro_batch_size, seq_len=cfg.seq_len,
                             recompute=program.schedule.recompute, specs=program.specs), scale)
    res = simulate_times(program.schedule, times, link=Topology(dev, stages_per_node),
                         tokens_per_iteration=cfg.num_microbatches * cfg.micro_batch_size * cfg.seq_len,
                         device_name=dev.name)
    res.meta.update(micro_batch_size=cfg.micro_batch_size, seq_len=cfg.seq_len, dtype="bf16",
                    stages_per_node=stages_per_node, device_memory_bytes=dev.memory_bytes)
    mem = memory.per_rank(program.schedule, res.peak_memory_bytes, per_tp_rank=scale > 1)
    return attach_memory(res, mem, tp=tp, dp=dp, dp_shard=dp_shard, optimizer=memory.optimizer.name)
