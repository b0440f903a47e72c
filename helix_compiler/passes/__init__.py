"""Graph passes: one module per pass, each ``verb_noun(gm, *, ...) -> PassResult``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx


@dataclass
class PassResult:
    gm: fx.GraphModule
    changed: bool
    info: dict = field(default_factory=dict)
