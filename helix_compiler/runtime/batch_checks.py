"""Checks of a batch's metadata inputs against what the compiled program assumes of them,
run on every rank before any message (every rank holds the same batch, so all raise alike).

Document masking (``helix::document_ids``) reads right padding from ``attention_mask`` (the
padding is one trailing document no real token sees) and documents from per-token document
ids (one contiguous run per document). A left-padded mask, a hole in the mask, a document id
that comes back after another one, or a counted label on a padding token would make the
pipeline compute something else than the user's model: they are rejected here.
"""

from __future__ import annotations

import torch

from ..errors import HelixError
from ..ir.stage_program import StageProgram

# what Hugging Face models use when these inputs are None
DEFAULT_INPUTS = {
    "position_ids": lambda ids: torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1),
    "attention_mask": lambda ids: torch.ones(ids.shape, dtype=torch.long, device=ids.device),
}


def check_documents(batch: dict[str, torch.Tensor], stage: StageProgram, rank: int) -> None:
    pos = batch.get("position_ids")
    if pos is not None and pos.numel() and int(pos.min()) < 0:
        raise HelixError(f"rank {rank}: position_ids hold {int(pos.min())}; positions must be >= 0 (each "
                         f"packed document counts 0, 1, 2, ... from its first token)")
    for name in stage.padding_inputs:
        _check_right_padding(name, batch[name], batch.get("labels"), stage.ignore_index, rank)
    for name in stage.document_inputs:
        _check_runs(name, batch[name], rank)


def _check_right_padding(name: str, mask: torch.Tensor, labels, ignore_index: int, rank: int) -> None:
    m = mask.to(torch.long)
    if bool(((m != 0) & (m != 1)).any()):
        raise HelixError(f"rank {rank}: {name} holds {int(m[(m != 0) & (m != 1)][0])}; a padding mask holds "
                         f"1 (token) and 0 (padding)")
    if bool((m[:, 1:] > m[:, :-1]).any()):
        row = int((m[:, 1:] > m[:, :-1]).any(1).nonzero()[0])
        raise HelixError(f"rank {rank}: {name} row {row} is {m[row].tolist()[:16]}...: only right padding "
                         f"(1 ... 1 0 ... 0) is supported; left padding or holes would change which "
                         f"tokens the real ones attend to. Pad on the right (tokenizer padding_side='right')")
    if labels is not None:
        counted = (m == 0) & (labels != ignore_index)
        if bool(counted.any()):
            row, col = (int(x) for x in counted.nonzero()[0])
            raise HelixError(f"rank {rank}: labels[{row}, {col}] = {int(labels[row, col])} on a padding token "
                             f"({name} is 0 there); set the labels of padding to {ignore_index} so the loss "
                             f"ignores them")


def _check_runs(name: str, ids: torch.Tensor, rank: int) -> None:
    change = ids[:, 1:] != ids[:, :-1]
    runs = change.sum(1) + 1
    for row in range(ids.shape[0]):
        distinct = int(ids[row].unique().numel())
        if distinct != int(runs[row]):
            raise HelixError(f"rank {rank}: {name} row {row} reuses a document id after another document "
                             f"({ids[row].tolist()[:16]}...); each document must be one contiguous run of "
                             f"its id, as in packed sequences")
