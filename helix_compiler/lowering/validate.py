"""Offline schedule validator: runs every rank's program in one process, symbolically.

Lock-step execution: at each step every rank tries to execute its next instruction. Compute
never waits (its inputs must already be on the rank); a ``RECV`` waits for the head of the
FIFO queue of its (src, dst) pair, and a message sent at step t is visible from step t+1 on.
Checks:

* static: segment names, micro batches, peers and folds in range; the fold of every message is
  ``m % F``; every segment of every micro batch has exactly one forward and one backward
  (``B``, or ``I`` + ``W``) on the same rank;
* dynamic: a forward's input (the previous segment's output) is on the rank; a backward runs
  after its forward, with its stash not freed and its output gradient on the rank; ``W`` after
  ``I``; ``R`` between forward and backward; a SEND only sends what the rank holds; a RECV
  gets exactly the message it names (else: misordered or wrong fold); no use after ``FREE``;
  no deadlock; no message left unreceived at the end.

Any failure raises :class:`~helix_compiler.errors.ScheduleError` whose message contains the
step x rank grid around the failing step, the failing step marked ``>>`` and the failing
instruction(s) marked ``!!`` (or ``??`` for ranks blocked in a deadlock).
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

from ..errors import ScheduleError
from ..ir.schedule import Instr, Schedule, segment_index

GRID_WINDOW = 12


@dataclass(frozen=True)
class ValidationReport:
    steps: int  # lock-step steps the schedule needs
    messages: int  # point-to-point messages


def _grid(schedule: Schedule, rows: list[list[str]], fail_row: list[str] | None,
          window: int = GRID_WINDOW) -> str:
    p = schedule.num_stages
    start = max(0, len(rows) - window)
    shown = rows[start:]
    width = 4
    for row in shown + ([fail_row] if fail_row else []):
        for cell in row:
            width = max(width, min(len(cell), 30))
    head = "  step | " + " | ".join(f"{'rank ' + str(r):<{width}}" for r in range(p))
    lines = [head, "-" * len(head)]
    if start:
        lines.append(f"  ... {start} earlier steps ...")
    for t, row in enumerate(shown, start):
        lines.append(f"  {t:4d} | " + " | ".join(f"{c[:30]:<{width}}" for c in row))
    if fail_row is not None:
        lines.append(f">>{len(rows):4d} | " + " | ".join(f"{c[:30]:<{width}}" for c in fail_row))
    return "\n".join(lines)


def _static_checks(schedule: Schedule) -> None:
    p, M, F, L = (schedule.num_stages, schedule.num_microbatches, schedule.num_folds,
                  schedule.num_layers)
    fwd: dict[tuple[str, int], list[int]] = defaultdict(list)
    bwd: dict[tuple[str, int, str], list[int]] = defaultdict(list)
    for prog in schedule.programs:
        r = prog.rank
        for j, i in enumerate(prog):
            where = f"rank {r}, instruction {j} '{i}'"
            segment_index(i.seg, L)  # raises for an unknown layer
            if i.mb >= M:
                raise ScheduleError(f"{where}: micro batch {i.mb} out of range 0..{M - 1}")
            if i.is_comm:
                if not 0 <= i.peer < p or i.peer == r:
                    raise ScheduleError(f"{where}: peer {i.peer} must be another rank in "
                                        f"0..{p - 1}")
                if i.fold != i.mb % F:
                    raise ScheduleError(f"{where}: fold f{i.fold} but micro batch {i.mb} is in "
                                        f"fold {i.mb % F} (= m % num_folds, num_folds={F})")
            if i.op == "F":
                fwd[(i.seg, i.mb)].append(r)
            elif i.op in ("B", "I", "W"):
                bwd[(i.seg, i.mb, i.op)].append(r)
    problems = []
    for s in schedule.specs:
        for m in range(M):
            f_ranks = fwd.get((s.name, m), [])
            b, ii, w = (bwd.get((s.name, m, o), []) for o in ("B", "I", "W"))
            if len(f_ranks) != 1:
                problems.append(f"F {s.name} m{m} appears {len(f_ranks)} times (ranks {f_ranks})")
                continue
            if b and (ii or w):
                problems.append(f"{s.name} m{m} has both B and I/W")
            elif b:
                if len(b) != 1 or b[0] != f_ranks[0]:
                    problems.append(f"B {s.name} m{m} on ranks {b}, expected once on rank "
                                    f"{f_ranks[0]} (where its forward ran)")
            elif ii or w:
                if ii != [f_ranks[0]] or w != [f_ranks[0]]:
                    problems.append(f"I/W {s.name} m{m} on ranks {ii}/{w}, expected once each on "
                                    f"rank {f_ranks[0]}")
            else:
                problems.append(f"{s.name} m{m} has a forward on rank {f_ranks[0]} but no backward")
            if len(problems) >= 8:
                break
    if problems:
        raise ScheduleError(f"{schedule.kind} schedule (p={p}, L={L}, M={M}, F={F}) does not "
                            "cover every segment of every micro batch exactly once:\n  "
                            + "\n  ".join(problems[:8]))


def validate_schedule(schedule: Schedule) -> ValidationReport:
    """Raise :class:`ScheduleError` (with the step x rank grid) if ``schedule`` is not a
    correct, deadlock-free program set; return a small report otherwise."""
    _static_checks(schedule)
    p = schedule.num_stages
    idx = schedule.seg_index
    names = [s.name for s in schedule.specs]
    last = len(names) - 1
    progs = [p_.instrs for p_ in schedule.programs]
    pcs = [0] * p
    held: list[set[tuple[str, int, int]]] = [set() for _ in range(p)]  # (value, c, m)
    done: list[set[tuple[str, int, int]]] = [set() for _ in range(p)]  # (op, c, m)
    queues: dict[tuple[int, int], deque] = defaultdict(deque)
    rows: list[list[str]] = []
    n_msgs = 0

    def fail(r: int, instr: Instr, why: str, row: list[str]) -> None:
        row = list(row)
        row[r] = "!! " + str(instr)
        raise ScheduleError(
            f"{schedule.kind} schedule invalid at step {len(rows)}, rank {r}, instruction "
            f"{pcs[r]} '{instr}': {why}\n{_grid(schedule, rows, row)}")

    def need(r: int, i: Instr, key: tuple[str, int, int], what: str, row) -> None:
        if key not in held[r]:
            value, c, m = key
            freed = (value, c, m) in freed_sets[r]
            fail(r, i, f"{what} ({value} {names[c]} m{m}) is not on rank {r}: "
                       + ("it was freed before" if freed else
                          "it is neither computed nor received on this rank before this point"),
                 row)

    freed_sets: list[set[tuple[str, int, int]]] = [set() for _ in range(p)]
    total = sum(len(x) for x in progs)
    executed = 0
    while executed < total:
        row = [""] * p
        new_msgs = []
        progressed = False
        for r in range(p):
            if pcs[r] >= len(progs[r]):
                continue
            i = progs[r][pcs[r]]
            c = idx[i.seg]
            m = i.mb
            if i.op == "RECV":
                q = queues[(i.peer, r)]
                if not q:
                    continue  # waits
                value, qc, qm, qf = q[0]
                if (value, qc, qm, qf) != (i.value, c, m, i.fold):
                    fail(r, i, f"misordered receive: messages from rank {i.peer} to rank {r} "
                               f"match FIFO and the next one is '{value} {names[qc]} m{qm} f{qf}'"
                               f" (sent in that order by rank {i.peer})", row)
                q.popleft()
                held[r].add((i.value, c, m))
            elif i.op == "SEND":
                need(r, i, (i.value, c, m), "the value to send", row)
                new_msgs.append(((r, i.peer), (i.value, c, m, i.fold)))
            elif i.op == "F":
                if ("F", c, m) in done[r]:
                    fail(r, i, "forward executed twice", row)
                if c > 0:
                    need(r, i, ("fwd", c - 1, m), "its input", row)
                done[r].add(("F", c, m))
                held[r].add(("stash", c, m))
                if c < last:
                    held[r].add(("fwd", c, m))
            elif i.op in ("B", "I"):
                if ("F", c, m) not in done[r]:
                    fail(r, i, f"backward before its forward: F {i.seg} m{m} has not run on "
                               f"rank {r}", row)
                need(r, i, ("stash", c, m), "the forward's stash", row)
                if c < last:
                    need(r, i, ("bwd", c, m), "the gradient of its output", row)
                done[r].add((i.op, c, m))
                if c > 0:
                    held[r].add(("bwd", c - 1, m))
            elif i.op == "W":
                if ("I", c, m) not in done[r]:
                    fail(r, i, f"weight gradient before its input gradient I {i.seg} m{m}", row)
                need(r, i, ("stash", c, m), "the forward's stash", row)
                done[r].add(("W", c, m))
            elif i.op == "R":
                if ("F", c, m) not in done[r]:
                    fail(r, i, f"recompute before the forward F {i.seg} m{m}", row)
                if ("B", c, m) in done[r] or ("I", c, m) in done[r]:
                    fail(r, i, "recompute after the backward it serves", row)
                need(r, i, ("stash", c, m), "the forward's stash", row)
            elif i.op == "FREE":
                need(r, i, (i.value, c, m), "the buffer to free", row)
                held[r].discard((i.value, c, m))
                freed_sets[r].add((i.value, c, m))
            row[r] = str(i)
            pcs[r] += 1
            executed += 1
            progressed = True
        if not progressed:
            blocked = []
            brow = [""] * p
            for r in range(p):
                if pcs[r] < len(progs[r]):
                    i = progs[r][pcs[r]]
                    brow[r] = "?? " + str(i)
                    blocked.append(f"rank {r} waits at instruction {pcs[r]} '{i}'")
                else:
                    brow[r] = "(done)"
            pending = [f"{src}->{dst}: {len(q)} message(s), next "
                       f"'{q[0][0]} {names[q[0][1]]} m{q[0][2]} f{q[0][3]}'"
                       for (src, dst), q in queues.items() if q]
            raise ScheduleError(
                f"{schedule.kind} schedule deadlocks at step {len(rows)}: "
                + "; ".join(blocked)
                + (f". Undelivered messages: {'; '.join(pending)}" if pending else
                   ". No message is in flight (a SEND is missing or comes after the wait)")
                + f"\n{_grid(schedule, rows, brow)}")
        for key, msg in new_msgs:
            queues[key].append(msg)
            n_msgs += 1
        rows.append(row)
    left = [f"{src}->{dst}: " + ", ".join(f"'{v} {names[c]} m{m} f{f}'" for v, c, m, f in q)
            for (src, dst), q in queues.items() if q]
    if left:
        raise ScheduleError(f"{schedule.kind} schedule leaves unmatched SENDs (never received): "
                            + "; ".join(left) + f"\n{_grid(schedule, rows, None)}")
    return ValidationReport(steps=len(rows), messages=n_msgs)
