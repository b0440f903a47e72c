"""The recompute policies: one table, read by the lowering, the cost model, the simulator
and the runtime (ARCHITECTURE.md 7: "one table of recompute policies").

For each policy (``POLICIES``) and segment kind (``KINDS``) a frozen :class:`RecomputeRule`
says

* ``stash``: what the forward keeps for the backward (:data:`STASH_ALL` autograd's saved
  tensors, :data:`STASH_INPUTS` the chain inputs, shipped weights included,
  :data:`STASH_INPUTS_ATTENTION` the inputs plus every attention's ``(out, lse)``,
  :data:`STASH_ALL_BUT_ATTENTION` autograd's saved tensors less the attentions'
  ``(out, lse)``);
* ``part``: the ``R`` instruction the lowering inserts before the segment's backward
  (``None``: none; ``"all"``: rerun the segment's forward from its stashed inputs;
  ``"pre"``: rerun it with every ``helix::attention`` replayed from the recorded
  ``(out, lse)``, so the attention forward never runs twice; see the ``attention_replay``
  module). No ``R`` is inserted where the backward directly follows
  its own forward on the rank (e.g. the head's ``F H m, B H m``): see
  ``lowering/recompute.py``;
* ``rerun``: which forward FLOPs the recompute costs (:data:`RERUN_NOTHING`,
  :data:`RERUN_ALL`, :data:`RERUN_ALL_BUT_ATTENTION`, :data:`RERUN_ATTENTION`).

:func:`part_rule` says what an ``R`` part (or its absence) means to the executor: whether the
forward runs under autograd, how ``helix::attention`` runs in the forward and in the
recompute, and what is stashed.

Policies: ``none`` (autograd keeps what it keeps); ``without_attention`` (HelixPipe,
HELIXPIPE.md 3: attention segments keep their inputs and ``(out, lse)`` and rerun everything
but the attention, other segments keep their inputs and rerun everything); ``full`` (every
segment keeps its inputs and reruns everything, attention included); ``selective``
(Megatron-style: only attention is rerun).

Known disagreement, kept as it is (the numbers of every consumer are unchanged by this
table): for ``selective`` on an attention segment the cost model and the simulator count
Megatron's selective recompute (keep all but ``(out, lse)``, rerun the attention only), while
the lowering inserts ``R .. all`` and the runtime therefore keeps only the inputs and reruns
the whole segment. :data:`KNOWN_MISMATCHES` lists it; :func:`mismatches` recomputes it.
A second, smaller one: where the lowering skips the ``R`` because the backward directly
follows its forward (the head), the executor runs that forward under autograd
(``part_rule(None)``: all activations, for the moment between F and B) while the simulator
counts the rule's ``stash`` (e.g. the inputs only), so its transient peak is under-counted.

It imports only ``ir.segment`` (for ``POLICIES``, ``KINDS``) and ``errors``, no torch: the
runtime may import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from ..errors import HelixError
from .segment import KINDS, POLICIES

STASH_ALL = "all activations"
STASH_INPUTS = "inputs only"
STASH_INPUTS_ATTENTION = "inputs + attention (out, lse)"
STASH_ALL_BUT_ATTENTION = "all activations but attention (out, lse)"
STASHES = (STASH_ALL, STASH_INPUTS, STASH_INPUTS_ATTENTION, STASH_ALL_BUT_ATTENTION)

RERUN_NOTHING = "nothing"
RERUN_ALL = "whole forward"
RERUN_ALL_BUT_ATTENTION = "forward but attention"
RERUN_ATTENTION = "attention only"
RERUNS = (RERUN_NOTHING, RERUN_ALL, RERUN_ALL_BUT_ATTENTION, RERUN_ATTENTION)

PARTS = (None, "all", "pre")  # the R instruction's part (None: no R); ir.schedule.RECOMPUTE_PARTS

T = TypeVar("T")


@dataclass(frozen=True)
class RecomputeRule:
    """What ``policy`` does to a segment of ``kind`` (see the module docstring)."""

    policy: str
    kind: str
    stash: str
    part: str | None
    rerun: str

    def __post_init__(self) -> None:
        assert self.policy in POLICIES and self.kind in KINDS, (self.policy, self.kind)
        assert self.stash in STASHES and self.rerun in RERUNS and self.part in PARTS, self
        assert (self.part is None) == (self.rerun == RERUN_NOTHING), self

    @property
    def recomputes(self) -> bool:
        """An ``R`` is inserted before the backward (unless it directly follows its forward)."""
        return self.part is not None

    @property
    def stashes_attention(self) -> bool:
        """The forward records each attention's ``(out, lse)`` for the backward to replay."""
        return self.stash == STASH_INPUTS_ATTENTION

    @property
    def reruns_attention(self) -> bool:
        """The recompute runs the attention forward again."""
        return self.rerun in (RERUN_ALL, RERUN_ATTENTION)

    def saved(self, *, all: T, inputs: T, attention: T) -> T:
        """The stash's size from its parts: ``all`` = autograd's saved tensors (policy
        ``none``), ``inputs`` = the chain inputs (shipped weights included), ``attention`` =
        the attentions' ``(out, lse)``. Works on numbers and sympy expressions."""
        if self.stash == STASH_ALL:
            return all
        if self.stash == STASH_INPUTS:
            return inputs
        if self.stash == STASH_INPUTS_ATTENTION:
            return inputs + attention
        return all - attention

    def rerun_flops(self, *, forward: T, attention: T, zero: T = 0) -> T:
        """Forward FLOPs the recompute reruns, from the segment's forward FLOPs and their
        attention share."""
        if self.rerun == RERUN_NOTHING:
            return zero
        if self.rerun == RERUN_ALL:
            return forward
        if self.rerun == RERUN_ALL_BUT_ATTENTION:
            return forward - attention
        return attention


def _rules() -> dict[tuple[str, str], RecomputeRule]:
    table: dict[tuple[str, str], RecomputeRule] = {}
    for kind in KINDS:
        attn = kind == "attn"
        rows = {
            "none": (STASH_ALL, None, RERUN_NOTHING),
            "full": (STASH_INPUTS, "all", RERUN_ALL),
            "without_attention": ((STASH_INPUTS_ATTENTION, "pre", RERUN_ALL_BUT_ATTENTION) if attn
                                  else (STASH_INPUTS, "all", RERUN_ALL)),
            "selective": ((STASH_ALL_BUT_ATTENTION, "all", RERUN_ATTENTION) if attn
                          else (STASH_ALL, None, RERUN_NOTHING)),
        }
        for policy in POLICIES:
            stash, part, rerun = rows[policy]
            table[(policy, kind)] = RecomputeRule(policy, kind, stash, part, rerun)
    return table


RULES: dict[tuple[str, str], RecomputeRule] = _rules()


@dataclass(frozen=True)
class PartRule:
    """What an ``R`` part (``None``: the segment has no ``R`` for this micro batch) means to
    the executor. ``forward_attention`` / ``recompute_attention`` are the
    ``attention_replay`` modes ("direct", "record", "replay")."""

    part: str | None
    forward_grad: bool  # the forward runs under autograd (its graph is the stash)
    forward_attention: str
    recompute_attention: str | None  # None: there is no recompute
    stash: str


PART_RULES: dict[str | None, PartRule] = {
    None: PartRule(None, True, "direct", None, STASH_ALL),
    "all": PartRule("all", False, "direct", "direct", STASH_INPUTS),
    "pre": PartRule("pre", False, "record", "replay", STASH_INPUTS_ATTENTION),
}

KNOWN_MISMATCHES = {("selective", "attn")}  # see the module docstring


def check_policy(policy: str, *, error: type[HelixError] = HelixError) -> str:
    """``policy`` if it is one of ``POLICIES``, else ``error`` naming the choices."""
    if policy not in POLICIES:
        raise error(f"recompute={policy!r} is not a policy; use one of {list(POLICIES)}")
    return policy


def policy_for(policy: str, kind: str) -> RecomputeRule:
    """The rule for a segment of ``kind`` (``KINDS``) under ``policy`` (``POLICIES``)."""
    check_policy(policy)
    if kind not in KINDS:
        raise HelixError(f"segment kind {kind!r} is not one of {list(KINDS)}")
    return RULES[(policy, kind)]


def recompute_part(policy: str, kind: str) -> str | None:
    """The ``R`` part inserted before the backward (None: no recompute)."""
    return policy_for(policy, kind).part


def recomputes(policy: str, kind: str) -> bool:
    return policy_for(policy, kind).recomputes


def stashes_attention(policy: str, kind: str) -> bool:
    return policy_for(policy, kind).stashes_attention


def reruns_attention(policy: str, kind: str) -> bool:
    return policy_for(policy, kind).reruns_attention


def part_rule(part: str | None) -> PartRule:
    """What the executor does for a forward/recompute whose ``R`` has this part."""
    if part not in PART_RULES:
        raise HelixError(f"R part {part!r} is not one of {list(PARTS)}")
    return PART_RULES[part]


def mismatches() -> set[tuple[str, str]]:
    """(policy, kind) pairs whose counted stash/rerun differ from what their R part runs."""
    out = set()
    for (policy, kind), rule in RULES.items():
        pr = PART_RULES[rule.part]
        reruns = {None: RERUN_NOTHING, "all": RERUN_ALL, "pre": RERUN_ALL_BUT_ATTENTION}[rule.part]
        if pr.stash != rule.stash or reruns != rule.rerun:
            out.add((policy, kind))
    return out


def describe() -> str:
    """The table as text (one line per policy and kind)."""
    lines = [f"{'policy':<18} {'kind':<6} {'R part':<6} {'stash':<42} rerun"]
    for (policy, kind), r in RULES.items():
        lines.append(f"{policy:<18} {kind:<6} {r.part or '-':<6} {r.stash:<42} {r.rerun}")
    return "\n".join(lines)
