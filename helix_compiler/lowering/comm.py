"""Lowering step: insert SEND/RECV pairs for every chain boundary that crosses stages.

Pure ``Schedule -> Schedule``. For micro batch m, the output of segment ``c`` goes from the
rank running ``F(c, m)`` to the rank running ``F(c+1, m)`` (``SEND fwd`` right after the
producer, ``RECV fwd`` right before the consumer); the gradient of that output goes from the
rank running the backward (``B`` or ``I``) of ``c+1`` back to the rank running the backward of
``c`` (``SEND bwd`` / ``RECV bwd``). Every message carries its fold ``m % F``.

Messages match FIFO per (src, dst) pair, so on every rank the RECVs from one peer are emitted
in that peer's SEND order: before a consumer, the rank receives every not-yet-received message
of that peer up to the one it needs. When a consumer needs messages in a different order than
they were sent, earlier messages are received early ("hoisted"; they wait in a buffer) and
``hoisted_receives`` counts them; this can make a wait depend on another fold's message.
The helix, GPipe, 1F1B, interleaved and ZB1P orders never need it (a test checks), so every
wait there is on exactly the value the next instruction uses, and folds never wait for each
other. The one exception is helix with ``head_stage != 0``: the head stage runs the heads in
the order stage 0 needs their gradients (the reverse of the order in which stage 0 sends the
final hidden states), so it receives all final hidden states before its first head; they
are all sent at the end of stage 0's forward anyway.
"""

from __future__ import annotations

from collections import defaultdict, deque

from ..errors import ScheduleError
from ..ir.schedule import Instr, Schedule


def _ranks(schedule: Schedule):
    fwd_rank: dict[tuple[int, int], int] = {}
    bwd_rank: dict[tuple[int, int], int] = {}
    idx = schedule.seg_index
    for prog in schedule.programs:
        for i in prog:
            if i.op == "F":
                fwd_rank[(idx[i.seg], i.mb)] = prog.rank
            elif i.op in ("B", "I"):
                bwd_rank[(idx[i.seg], i.mb)] = prog.rank
    return fwd_rank, bwd_rank


def hoisted_receives(schedule: Schedule) -> int:
    """Number of RECVs not immediately followed (after other RECVs and recomputes) by the
    instruction that consumes them."""
    idx = schedule.seg_index
    count = 0
    for prog in schedule.programs:
        ins = prog.instrs
        for j, i in enumerate(ins):
            if i.op != "RECV":
                continue
            k = j + 1
            while k < len(ins) and ins[k].op in ("RECV", "R"):
                k += 1
            nxt = ins[k] if k < len(ins) else None
            c = idx[i.seg]
            ok = nxt is not None and nxt.mb == i.mb and (
                (i.value == "fwd" and nxt.op == "F" and idx[nxt.seg] == c + 1)
                or (i.value == "bwd" and nxt.op in ("B", "I") and idx[nxt.seg] == c))
            count += not ok
    return count


def _receive_until(out: list[Instr], r: int, src: int, key: tuple[str, int, int],
                   queue: deque | None, received: set, names: list[str], F: int) -> None:
    """Append RECVs from ``src`` in its send order until ``key`` has been received."""
    while key not in received:
        if not queue:
            raise ScheduleError(
                f"insert_communication: rank {r} needs {key[0]} {names[key[1]]} m{key[2]} from "
                f"rank {src}, which never sends it")
        value, c, m = queue.popleft()
        out.append(Instr("RECV", names[c], m, value=value, peer=src, fold=m % F))
        received.add((value, c, m))


def insert_communication(schedule: Schedule) -> Schedule:
    if any(i.is_comm for p in schedule.programs for i in p):
        raise ScheduleError("insert_communication: the schedule already has SEND/RECV "
                            f"instructions (lowered steps: {schedule.lowered})")
    names = [s.name for s in schedule.specs]
    idx = schedule.seg_index
    last = len(names) - 1
    F = schedule.num_folds
    fwd_rank, bwd_rank = _ranks(schedule)

    # pass 1: SENDs right after their producers; remember each pair's send order
    sent: dict[tuple[int, int], list[tuple[str, int, int]]] = defaultdict(list)
    with_sends: list[list[Instr]] = []
    for prog in schedule.programs:
        r = prog.rank
        out: list[Instr] = []
        for i in prog:
            out.append(i)
            c = idx[i.seg] if i.is_compute else None
            if i.op == "F" and c < last:
                dst = fwd_rank.get((c + 1, i.mb))
                if dst is not None and dst != r:
                    out.append(Instr("SEND", i.seg, i.mb, value="fwd", peer=dst, fold=i.mb % F))
                    sent[(r, dst)].append(("fwd", c, i.mb))
            elif i.op in ("B", "I") and c > 0:
                dst = bwd_rank.get((c - 1, i.mb))
                if dst is not None and dst != r:
                    out.append(Instr("SEND", names[c - 1], i.mb, value="bwd", peer=dst,
                                     fold=i.mb % F))
                    sent[(r, dst)].append(("bwd", c - 1, i.mb))
        with_sends.append(out)

    # pass 2: RECVs before their consumers, in each peer's send order
    programs: list[list[Instr]] = []
    for r, ins in enumerate(with_sends):
        queues = {src: deque(msgs) for (src, dst), msgs in sent.items() if dst == r}
        received: set[tuple[str, int, int]] = set()
        out: list[Instr] = []
        for i in ins:
            need = None
            if i.op == "F":
                c = idx[i.seg]
                src = fwd_rank.get((c - 1, i.mb)) if c > 0 else None
                need = (src, ("fwd", c - 1, i.mb))
            elif i.op in ("B", "I"):
                c = idx[i.seg]
                src = bwd_rank.get((c + 1, i.mb)) if c < last else None
                need = (src, ("bwd", c, i.mb))
            if need is not None and need[0] is not None and need[0] != r:
                _receive_until(out, r, need[0], need[1], queues.get(need[0]), received, names, F)
            out.append(i)
        programs.append(out)
    return schedule.replace_programs(programs, "comm")
