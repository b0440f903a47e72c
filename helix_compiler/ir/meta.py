"""Namespaced ``node.meta`` keys written by the passes (one place, so they never collide)."""

from __future__ import annotations

ROLE = "helix_role"  # embed | pre | attn | post | final | head
LAYER = "helix_layer"  # 1-based layer index, or None outside layers
REMAT = "helix_remat"  # True: input-independent, recomputed on every stage that needs it
ATTENTION_CAUSAL = "helix_causal"
# on a helix::attention node: (left, right) sliding window as the op's ``window`` kwarg, None = none
ATTENTION_WINDOW = "helix_window"
MLP_CHUNK = "helix_mlp_chunk"  # on a chunked-MLP node: kind, num_chunks, recompute
# on a helix::attention node with document masking: the user inputs its document ids come from,
# {"position_ids": name | None, "segment_ids": name | None, "attention_mask": name | None}
ATTENTION_DOCUMENTS = "helix_documents"
