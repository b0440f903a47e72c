"""Segment graphs: what ``build_segments`` produces and the runtime executes."""

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
    recompute: str = "none"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def code(self) -> str:
        return self.gm.code
