"""Pass: recomputation boundaries, recorded for the runtime and the cost model.

Policies (``node.meta[meta.RECOMPUTE]`` is "save" or "recompute" per node; ``seg.recompute``
names the policy):
* ``none``: autograd keeps what it keeps.
* ``without_attention`` (HelixPipe): a parameter chunk keeps only its inputs and reruns its
  forward in backward; an attention segment keeps its inputs plus the attention's ``out`` and
  ``lse`` and reruns only its pre-function (e.g. the QKV projection), never the attention.
* ``full``: every segment keeps only its inputs and reruns everything.
* ``selective`` (Megatron-style): only the attention op is rerun; everything else is kept.
The head (logits + loss) never stashes logits across micro batches unless the policy is
``none``: it keeps the final hidden state and reruns in backward.
"""

from __future__ import annotations

import torch

from ..errors import HelixError
from ..ir import meta
from ..ir.program import Segment
from ..ir.segment import POLICIES
from ..kernels import attention as _attention_op  # noqa: F401  (registers helix::attention)

HELIX_ATTENTION = torch.ops.helix.attention.default


def mark_recompute(segments: list[Segment], *, policy: str) -> list[Segment]:
    if policy not in POLICIES:
        raise HelixError(f"recompute={policy!r} is not a policy; use one of {list(POLICIES)}")
    for seg in segments:
        seg.recompute = policy
        for node in seg.gm.graph.nodes:
            if node.op != "call_function":
                continue
            is_attn = node.target == HELIX_ATTENTION
            if policy == "none":
                mark = "save"
            elif policy == "full":
                mark = "recompute"
            elif policy == "without_attention":
                mark = "save" if is_attn else "recompute"
            else:  # selective
                mark = "recompute" if is_attn else "save"
            node.meta[meta.RECOMPUTE] = mark
    return segments
