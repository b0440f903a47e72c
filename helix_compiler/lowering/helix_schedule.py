"""HelixPipe's two-fold first-in-last-out order (HELIXPIPE.md 2.2 / 2.3), as data.

How the order is generated
--------------------------
The reference writes the order as nested loops (prologue, warm-up, steady, cool-down,
epilogue; attention and parameter sub-phases). All of those loops are one rule: give chain
item ``c`` (``E`` = 0, ``A_l`` = 2l-1, ``P_l`` = 2l, ``PL`` = 2L) of a micro batch with offset
``d`` in group ``k`` the virtual time::

    tau = c + d + k * (2L + 1/2)

and let every stage run its items in increasing ``tau``. (Check against 2.2, stage r,
chunk ``l = i*p + r``: its attention sub-phase ``A(l-d)`` for ``d = p-2 .. 0`` has
``tau = 2(l-d) - 1 + d = 2l - 1 - d``, decreasing in d, then ``P(l)`` of ``d = 0`` at
``2l``, then the parameter sub-phase ``P(l)`` of ``d = 1 .. p-1`` at ``2l + d`` and the local
``A(l+1)`` of ``d = p-1`` at ``2l + p``; chunk ``l + p`` starts at ``2l + p + 1``.) The group
offset ``2L + 1/2`` puts the next group's ``E`` of offset d right after ``PL`` of the previous
group's offset d on stage 0, exactly where 2.2 interleaves them; on the other stages the
groups follow each other.

Consecutive items of one stage with the same offset ``d`` and adjacent times form one unit
(the reference's fused autograd units such as ``(E,A1)`` or ``(A4,P4)``); each unit is run
for fold ``f = 0 .. F-1`` in turn (2.2: ``for f: ...``).

Because every data dependency goes from ``tau`` to ``tau + 1`` (forward) and the backward is
the exact reverse, every stage runs in the order of one global clock: the schedule is
deadlock-free for any ``p, L, M, F``, including ``L % p != 0`` (which 2.2 does not cover and
where the same rule gives cyclic dealing; ties in ``tau`` are broken by offset).

The loss head ``H`` runs at the start of each micro batch's backward on its stage (2.6):
``F(H, m), B(H, m), B(PL, m)``. With ``head_stage != 0`` the head stage runs all
``F(H, m), B(H, m)`` pairs between its forward and its backward, in the order stage 0 needs
the gradients (its ``B(PL)`` order), so its idle time at the forward/backward turn absorbs
the head and stage 0 only waits for one head before its backward starts.

Deliberate difference from the reference
----------------------------------------
The backward of every stage is the *exact* reverse of its forward. The reference's stage 0
ends with ``E m0, E m1`` (an artefact of its final clean-up loop, HELIXPIPE.md 2.4); here it
ends with ``E m1, E m0``: strict first-in-last-out keeps the per-(fold, offset) stash lists
LIFO and the rule "backward = reversed forward" has no exception to special-case in the
runtime. Both orders have the same timing (the two units are independent and last).
"""

from __future__ import annotations

from ..ir.schedule import Instr, RankProgram, Schedule
from ..ir.segment import chain_specs
from .placement import helix_placement


def helix_forward_units(num_layers: int, num_stages: int, num_microbatches: int,
                        num_folds: int = 2) -> list[list[list[tuple[int, int, int]]]]:
    """Per stage, the forward units in order; a unit is a list of ``(c, d, k)`` (chain
    position, offset, group); run it once per fold."""
    pl = helix_placement(num_layers, num_stages, num_microbatches, num_folds)
    p, F, L = num_stages, num_folds, num_layers
    groups = num_microbatches // (p * F)
    period2 = 4 * L + 1  # 2 * (2L + 1/2)
    items: list[list[tuple[int, int, int, int]]] = [[] for _ in range(p)]
    for k in range(groups):
        for d in range(p):
            m0 = k * p * F + d * F
            for c in range(0, 2 * L + 1):  # E .. PL (the head is placed separately)
                items[pl.stage(c, m0)].append((k * period2 + 2 * (c + d), d, c, k))
    out: list[list[list[tuple[int, int, int]]]] = []
    for st in range(p):
        units: list[list[tuple[int, int, int]]] = []
        prev = None
        for tau2, d, c, k in sorted(items[st]):
            if prev is not None and prev[1] == d and tau2 - prev[0] <= 2:
                units[-1].append((c, d, k))
            else:
                units.append([(c, d, k)])
            prev = (tau2, d)
        out.append(units)
    return out


def helix_schedule(num_layers: int, num_stages: int, num_microbatches: int, num_folds: int = 2,
                   *, head_stage: int | None = None) -> Schedule:
    """Compute-only helix schedule (F and B instructions; no communication, recompute or
    frees yet: those are the lowering steps)."""
    pl = helix_placement(num_layers, num_stages, num_microbatches, num_folds,
                         head_stage=head_stage)  # validates the request
    p, F, L = num_stages, num_folds, num_layers
    names = [s.name for s in chain_specs(L)]
    pl_name, h_name = names[2 * L], names[2 * L + 1]
    h_stage = pl.stage(2 * L + 1, 0)
    units = helix_forward_units(L, p, num_microbatches, F)

    fwd: list[list[Instr]] = []
    for st in range(p):
        ops = []
        for unit in units[st]:
            for f in range(F):
                for c, d, k in unit:
                    ops.append(Instr("F", names[c], k * p * F + d * F + f))
        fwd.append(ops)

    # the order in which stage 0 runs B(PL, m): the reverse of its F(PL, m) order
    pl_bwd_order = [i.mb for i in reversed(fwd[0]) if i.seg == pl_name]

    programs = []
    for st in range(p):
        ops = list(fwd[st])
        if st == h_stage and h_stage != 0:
            for m in pl_bwd_order:
                ops += [Instr("F", h_name, m), Instr("B", h_name, m)]
        for i in reversed(fwd[st]):
            if i.seg == pl_name and h_stage == st:
                ops += [Instr("F", h_name, i.mb), Instr("B", h_name, i.mb)]
            ops.append(Instr("B", i.seg, i.mb))
        programs.append(RankProgram(st, tuple(ops)))
    return Schedule("helix", p, num_microbatches, F, L, tuple(programs),
                    head_stage=h_stage)
