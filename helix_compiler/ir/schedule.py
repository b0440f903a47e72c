"""Schedules as data: per-rank instruction lists over the segment chain.

A schedule is a tuple of :class:`RankProgram`, one per pipeline rank (= stage), each a tuple of
frozen :class:`Instr`. Nothing here runs anything: generators in ``helix_compiler.lowering``
build schedules, pure lowering steps rewrite them (``Schedule -> Schedule``), the validator
runs them symbolically, the simulator times them and the runtime interprets them.

Instruction kinds and their one-line text form (``str(instr)`` parses back exactly with
:meth:`Instr.parse`)::

    F A3 m5                 forward of segment A3 for micro batch 5
    B A3 m5                 backward (input + weight gradients) of A3 for micro batch 5
    I A3 m5                 input-gradient half of the backward (zero-bubble "B")
    W A3 m5                 weight-gradient half of the backward (zero-bubble "W")
    R A3 m5 all             recompute the whole forward of A3 (activation checkpointing)
    R A3 m5 pre             recompute only the pre-function of an attention segment (the QKV
                            projection); the attention itself is never rerun (saved out + lse)
    SEND fwd A3 m5 ->2 f1   send the output of A3 (micro batch 5, fold 1) to rank 2 (async)
    RECV fwd A3 m5 <-0 f1   wait for the output of A3 from rank 0 (the consumer waits here)
    SEND bwd A3 m5 ->1 f1   send the gradient of A3's output (computed by the backward of the
                            next segment of the chain) to rank 1
    RECV bwd A3 m5 <-2 f1   wait for the gradient of A3's output from rank 2
    FREE stash A3 m5        drop what A3's forward saved for its backward
    FREE fwd A3 m5          drop this rank's buffer holding the output of A3
    FREE bwd A3 m5          drop this rank's buffer holding the gradient of A3's output

A message is named by the chain boundary it crosses (the producing segment) and its direction;
messages match FIFO per (src, dst) pair, and every message carries its fold ``m % F``.

``str(schedule)`` prints a header line and each rank's instruction list; it parses back
exactly with :func:`parse_schedule`. :meth:`Schedule.picture` is a compact per-rank view of
the compute instructions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import cached_property

from ..errors import ScheduleError
from .segment import POLICIES, SegmentSpec, chain_specs

OPS = ("F", "B", "I", "W", "R", "SEND", "RECV", "FREE")
COMPUTE_OPS = ("F", "B", "I", "W", "R")
COMM_OPS = ("SEND", "RECV")
BACKWARD_OPS = ("B", "I", "W")
DIRECTIONS = ("fwd", "bwd")
FREE_VALUES = ("stash", "fwd", "bwd")
RECOMPUTE_PARTS = ("all", "pre")
SCHEDULE_KINDS = ("helix", "gpipe", "1f1b", "interleaved", "zb1p")
# A rank posts each receive this many RECVs before the one it waits for (gloo moves data only
# into a posted buffer, so the next input arrives while the rank computes). The buffer exists
# from the post: the runtime does this and the simulator counts it.
RECV_LOOKAHEAD = 2

_SEG_RE = re.compile(r"^(E|H|[AP][1-9][0-9]*)$")


@dataclass(frozen=True)
class Instr:
    """One instruction of a rank program (see the module docstring for the text forms).

    ``seg`` is the segment name (``"E"``, ``"A3"``, ``"P3"``, ``"H"``), ``mb`` the micro batch.
    ``value`` is the direction of a SEND/RECV (``"fwd"``/``"bwd"``) or what a FREE drops
    (``"stash"``/``"fwd"``/``"bwd"``); ``peer`` and ``fold`` only for SEND/RECV; ``part`` only
    for R (``"all"``/``"pre"``).
    """

    op: str
    seg: str
    mb: int
    value: str | None = None
    peer: int | None = None
    fold: int | None = None
    part: str | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ScheduleError(f"instruction op {self.op!r} is not one of {OPS}")
        if not isinstance(self.seg, str) or not _SEG_RE.match(self.seg):
            raise ScheduleError(
                f"segment name {self.seg!r} in a {self.op} instruction is not a chain segment "
                "name; valid names are E, A<l>, P<l>, H (l >= 1)")
        if not isinstance(self.mb, int) or self.mb < 0:
            raise ScheduleError(f"micro batch {self.mb!r} must be an int >= 0")
        comm = self.op in COMM_OPS
        if comm:
            if self.value not in DIRECTIONS:
                raise ScheduleError(f"{self.op} value {self.value!r} must be one of {DIRECTIONS}")
            if not isinstance(self.peer, int) or self.peer < 0:
                raise ScheduleError(f"{self.op} needs a peer rank >= 0, got {self.peer!r}")
            if not isinstance(self.fold, int) or self.fold < 0:
                raise ScheduleError(f"{self.op} needs a fold >= 0, got {self.fold!r}")
        elif self.peer is not None or self.fold is not None:
            raise ScheduleError(f"only SEND/RECV carry peer/fold, got {self.op} with "
                                f"peer={self.peer!r} fold={self.fold!r}")
        if self.op == "FREE":
            if self.value not in FREE_VALUES:
                raise ScheduleError(f"FREE value {self.value!r} must be one of {FREE_VALUES}")
        elif not comm and self.value is not None:
            raise ScheduleError(f"{self.op} takes no value, got {self.value!r}")
        if self.op == "R":
            if self.part not in RECOMPUTE_PARTS:
                raise ScheduleError(f"R part {self.part!r} must be one of {RECOMPUTE_PARTS}")
        elif self.part is not None:
            raise ScheduleError(f"only R carries a part, got {self.op} with part={self.part!r}")

    # ------------------------------------------------------------------ text form
    def __str__(self) -> str:
        if self.op in ("F", "B", "I", "W"):
            return f"{self.op} {self.seg} m{self.mb}"
        if self.op == "R":
            return f"R {self.seg} m{self.mb} {self.part}"
        if self.op == "SEND":
            return f"SEND {self.value} {self.seg} m{self.mb} ->{self.peer} f{self.fold}"
        if self.op == "RECV":
            return f"RECV {self.value} {self.seg} m{self.mb} <-{self.peer} f{self.fold}"
        return f"FREE {self.value} {self.seg} m{self.mb}"

    @staticmethod
    def parse(text: str) -> Instr:
        """Inverse of ``str``: ``Instr.parse(str(i)) == i`` for every valid instruction."""
        toks = text.split()
        try:
            op = toks[0]
            if op in ("F", "B", "I", "W") and len(toks) == 3:
                return Instr(op, toks[1], _mb(toks[2]))
            if op == "R" and len(toks) == 4:
                return Instr("R", toks[1], _mb(toks[2]), part=toks[3])
            if op in COMM_OPS and len(toks) == 6:
                arrow = "->" if op == "SEND" else "<-"
                if not toks[4].startswith(arrow) or not toks[5].startswith("f"):
                    raise ValueError
                return Instr(op, toks[2], _mb(toks[3]), value=toks[1],
                             peer=int(toks[4][2:]), fold=int(toks[5][1:]))
            if op == "FREE" and len(toks) == 4:
                return Instr("FREE", toks[2], _mb(toks[3]), value=toks[1])
        except (IndexError, ValueError):
            pass
        raise ScheduleError(
            f"cannot parse instruction {text!r}; forms are 'F A3 m5', 'B|I|W A3 m5', "
            "'R A3 m5 all|pre', 'SEND fwd|bwd A3 m5 ->2 f1', 'RECV fwd|bwd A3 m5 <-0 f1', "
            "'FREE stash|fwd|bwd A3 m5'")

    # ------------------------------------------------------------------ helpers
    @property
    def is_compute(self) -> bool:
        return self.op in COMPUTE_OPS

    @property
    def is_comm(self) -> bool:
        return self.op in COMM_OPS

    def short(self) -> str:
        """Compact token for pictures: ``A3.5`` (forward), ``b:A3.5``, ``i:``, ``w:``, ``r:``."""
        prefix = {"F": "", "B": "b:", "I": "i:", "W": "w:", "R": "r:"}.get(self.op)
        if prefix is None:
            return str(self)
        return f"{prefix}{self.seg}.{self.mb}"


def _mb(tok: str) -> int:
    if not tok.startswith("m"):
        raise ValueError(tok)
    return int(tok[1:])


def segment_index(name: str, num_layers: int) -> int:
    """Chain position of a segment name: E=0, A_l=2l-1, P_l=2l, H=2L+1."""
    if name == "E":
        return 0
    if name == "H":
        return 2 * num_layers + 1
    layer = int(name[1:])
    if not 1 <= layer <= num_layers:
        raise ScheduleError(f"segment {name!r} names layer {layer}, valid layers are 1..{num_layers}")
    return 2 * layer - 1 if name[0] == "A" else 2 * layer


@dataclass(frozen=True)
class RankProgram:
    """The instruction list one rank executes, in order."""

    rank: int
    instrs: tuple[Instr, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "instrs", tuple(self.instrs))

    def __len__(self) -> int:
        return len(self.instrs)

    def __iter__(self):
        return iter(self.instrs)

    def compute(self) -> list[Instr]:
        return [i for i in self.instrs if i.is_compute]

    def __str__(self) -> str:
        return "\n".join([f"rank {self.rank}:"] + [f"  {i}" for i in self.instrs])


@dataclass(frozen=True)
class Schedule:
    """A whole pipeline schedule: one program per rank plus what it was built from.

    ``recompute`` is the recomputation policy (``POLICIES``) the schedule was lowered with,
    ``lowered`` the lowering steps already applied, in order.
    """

    kind: str
    num_stages: int
    num_microbatches: int
    num_folds: int
    num_layers: int
    programs: tuple[RankProgram, ...]
    recompute: str = "none"
    virtual_stages: int | None = None
    head_stage: int | None = None
    lowered: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "programs", tuple(self.programs))
        object.__setattr__(self, "lowered", tuple(self.lowered))
        if self.kind not in SCHEDULE_KINDS:
            raise ScheduleError(f"schedule kind {self.kind!r} is not one of {SCHEDULE_KINDS}")
        if self.recompute not in POLICIES:
            raise ScheduleError(f"recompute policy {self.recompute!r} is not one of {POLICIES}")
        if len(self.programs) != self.num_stages or any(
                p.rank != r for r, p in enumerate(self.programs)):
            raise ScheduleError(
                f"a schedule with num_stages={self.num_stages} needs programs for ranks "
                f"0..{self.num_stages - 1} in order, got ranks {[p.rank for p in self.programs]}")

    # ------------------------------------------------------------------ derived data
    @cached_property
    def specs(self) -> tuple[SegmentSpec, ...]:
        return tuple(chain_specs(self.num_layers))

    @cached_property
    def seg_index(self) -> dict[str, int]:
        return {s.name: s.index for s in self.specs}

    def spec(self, name: str) -> SegmentSpec:
        return self.specs[self.seg_index[name]]

    def fold_of(self, mb: int) -> int:
        return mb % self.num_folds

    def replace_programs(self, programs, step: str, **changes) -> Schedule:
        """A copy with new programs and ``step`` appended to ``lowered`` (for lowering steps)."""
        progs = tuple(p if isinstance(p, RankProgram) else RankProgram(r, tuple(p))
                      for r, p in enumerate(programs))
        return replace(self, programs=progs, lowered=self.lowered + (step,), **changes)

    def count(self, op: str, rank: int | None = None, kind: str | None = None) -> int:
        """Number of ``op`` instructions (on ``rank``; on segments of ``kind``)."""
        progs = self.programs if rank is None else (self.programs[rank],)
        return sum(1 for p in progs for i in p
                   if i.op == op and (kind is None or self.spec(i.seg).kind == kind))

    # ------------------------------------------------------------------ text form
    def header(self) -> str:
        vs = "-" if self.virtual_stages is None else str(self.virtual_stages)
        hs = "-" if self.head_stage is None else str(self.head_stage)
        low = ",".join(self.lowered) if self.lowered else "-"
        return (f"schedule kind={self.kind} stages={self.num_stages} "
                f"microbatches={self.num_microbatches} folds={self.num_folds} "
                f"layers={self.num_layers} recompute={self.recompute} virtual_stages={vs} "
                f"head_stage={hs} lowered={low}")

    def to_text(self) -> str:
        return "\n".join([self.header()] + [str(p) for p in self.programs]) + "\n"

    def __str__(self) -> str:
        return self.to_text()

    def picture(self, width: int = 100) -> str:
        """Compact per-rank view of the compute instructions, wrapped at ``width`` columns."""
        lines = [self.header()]
        for prog in self.programs:
            toks = [i.short() for i in prog if i.is_compute]
            head = f"r{prog.rank}|"
            cur = head
            for t in toks:
                if len(cur) + len(t) + 1 > width and cur != head:
                    lines.append(cur)
                    cur = " " * len(head)
                cur += " " + t
            lines.append(cur)
        return "\n".join(lines)


def parse_schedule(text: str) -> Schedule:
    """Inverse of ``Schedule.to_text``."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("schedule "):
        raise ScheduleError("schedule text must start with a 'schedule kind=... ' header line")
    fields: dict[str, str] = {}
    for tok in lines[0].split()[1:]:
        key, _, val = tok.partition("=")
        fields[key] = val
    need = ("kind", "stages", "microbatches", "folds", "layers", "recompute", "virtual_stages",
            "head_stage", "lowered")
    missing = [k for k in need if k not in fields]
    if missing:
        raise ScheduleError(f"schedule header lacks {missing}; header was {lines[0]!r}")
    programs: list[list[Instr]] = []
    for ln in lines[1:]:
        if ln.startswith("rank "):
            r = int(ln[5:].rstrip(":"))
            if r != len(programs):
                raise ScheduleError(f"rank {r} out of order in schedule text (expected {len(programs)})")
            programs.append([])
        else:
            if not programs:
                raise ScheduleError(f"instruction {ln.strip()!r} before any 'rank N:' line")
            programs[-1].append(Instr.parse(ln))

    def opt(v: str) -> int | None:
        return None if v == "-" else int(v)

    return Schedule(
        kind=fields["kind"], num_stages=int(fields["stages"]),
        num_microbatches=int(fields["microbatches"]), num_folds=int(fields["folds"]),
        num_layers=int(fields["layers"]),
        programs=tuple(RankProgram(r, tuple(p)) for r, p in enumerate(programs)),
        recompute=fields["recompute"], virtual_stages=opt(fields["virtual_stages"]),
        head_stage=opt(fields["head_stage"]),
        lowered=() if fields["lowered"] == "-" else tuple(fields["lowered"].split(",")),
    )
