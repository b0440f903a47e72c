"""Segment graphs (what ``build_segments`` produces and the runtime executes) and the record
of each compiler pass ``compile_program`` ran."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .segment import SegmentCost, SegmentSpec


@dataclass
class Segment:
    """One standalone piece of the model for one micro batch.

    Called as ``gm(*chain_inputs, *user_inputs)`` and returns a tuple of ``chain_outputs``
    (the values the next segment of the chain needs). Parameters the segment uses locally are
    attributes of ``gm`` (the user's own ``nn.Parameter`` objects); parameters it receives from
    its chain predecessor (weights shipped to an attention stage) are chain inputs.
    """

    spec: SegmentSpec
    gm: fx.GraphModule
    chain_inputs: list[str]  # names of values received from the previous segment
    user_inputs: list[str]  # model inputs it reads ("input_ids", "labels")
    chain_outputs: list[str]  # names of values passed to the next segment
    params: list[str]  # FQNs (in the captured module) of parameters used locally
    shipped_params: list[str] = field(default_factory=list)  # FQNs received as chain inputs
    input_meta: list[tuple[tuple, torch.dtype]] = field(default_factory=list)  # (shape, dtype) of chain inputs
    output_meta: list[tuple[tuple, torch.dtype]] = field(default_factory=list)
    cost: SegmentCost | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def code(self) -> str:
        return self.gm.code


@dataclass(frozen=True)
class PassRecord:
    """One pass ``compile_program`` ran: its name, wall seconds, and the FX nodes (all ops,
    placeholders and outputs included) of the program before and after it: the captured graph
    up to the cut, the sum over the segment graphs from ``build_segments`` on. ``detail`` is a
    short note (what the pass found or made); ``cpu_s`` the process CPU seconds of the pass
    (on a loaded machine wall time grows with the load, CPU time much less)."""

    name: str
    wall_s: float
    nodes_before: int
    nodes_after: int
    detail: str = ""
    cpu_s: float = 0.0

    def __str__(self) -> str:
        delta = self.nodes_after - self.nodes_before
        return (f"{self.name:<22} {self.wall_s:>8.3f} s {self.cpu_s:>8.3f} s {self.nodes_before:>7} -> "
                f"{self.nodes_after:<7} ({delta:+d}){'  ' + self.detail if self.detail else ''}")


def format_pass_records(records: list[PassRecord]) -> str:
    wall, cpu = sum(r.wall_s for r in records), sum(r.cpu_s for r in records)
    lines = [f"{'pass':<22} {'wall':>10} {'CPU':>10} {'nodes before -> after':>24}"]
    lines += [str(r) for r in records]
    lines.append(f"{'total':<22} {wall:>8.3f} s {cpu:>8.3f} s")
    return "\n".join(lines)
