"""What a rank holds of the model's state besides its parameters, by the user's names.

``StageProgram.params`` are the parameters a rank owns; :class:`OwnedState` adds the buffers
its segments read (rotary caches, normalization statistics), the other names of tied
tensors, and every state-dict key of the whole model, so that the pipeline module can load a
full model's state dict (other ranks' keys ignored) and still reject a key that belongs to no
rank (``runtime.state_dict``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class OwnedState:
    buffers: Mapping[str, torch.Tensor] = field(default_factory=dict)  # read by this rank's segments
    non_persistent: frozenset[str] = frozenset()  # buffers a state dict does not carry
    aliases: Mapping[str, str] = field(default_factory=dict)  # other name of a tied tensor -> its first name
    model_keys: frozenset[str] = frozenset()  # every state_dict key of the full model (all ranks)
