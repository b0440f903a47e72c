"""Namespaced ``node.meta`` keys written by the passes (one place, so they never collide)."""

from __future__ import annotations

ROLE = "helix_role"  # one of ROLES below
LAYER = "helix_layer"  # 1-based layer index, or None outside layers
SEGMENT = "helix_segment"  # name of the segment the node was placed in, e.g. "A3"
REMAT = "helix_remat"  # True: input-independent, recomputed on every stage that needs it
RECOMPUTE = "helix_recompute"  # recompute policy applied to the node's segment
ATTENTION_CAUSAL = "helix_causal"

ROLES = ("embed", "pre", "attn", "post", "final", "head")
