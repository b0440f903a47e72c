"""Pure-torch helpers for document masking of ``helix::attention`` (``doc_ids``).

``doc_ids`` is ``[batch, seq]`` (int32 or int64): per row the ids are nondecreasing from 0 and
every document is one contiguous run. A document starts at every row start and wherever the
id changes; documents are numbered over the *flattened* ``batch x seq`` tokens (row-major), the
layout of flash-attn's varlen kernels: ``cu_seqlens[d]`` is the flattened index of the first
token of document ``d``, ``cu_seqlens[-1] == batch * seq``.

Everything here is computed with tensor ops on the ids' device; only ``document_bounds``
synchronizes with the host, once (for the number of documents and the longest one).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import HelixError


def check_doc_ids(doc_ids: Tensor, batch: int, seq_q: int, seq_k: int) -> None:
    """``doc_ids`` must be an integer ``[batch, seq]`` tensor with ``seq == seq_q == seq_k``."""
    if doc_ids.dtype not in (torch.int32, torch.int64):
        raise HelixError(f"helix::attention doc_ids must be int32 or int64, not {doc_ids.dtype}")
    if seq_q != seq_k:
        raise HelixError(f"helix::attention doc_ids need seq_q == seq_k, got {seq_q} != {seq_k}")
    if tuple(doc_ids.shape) != (batch, seq_q):
        raise HelixError(f"helix::attention doc_ids of shape {tuple(doc_ids.shape)}: expected "
                         f"[batch, seq] = {[batch, seq_q]}")


def document_starts(doc_ids: Tensor) -> Tensor:
    """Bool ``[batch, seq]``: the token opens a document (row starts and id changes)."""
    starts = torch.ones(doc_ids.shape, dtype=torch.bool, device=doc_ids.device)
    if doc_ids.shape[-1] > 1:
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def _flat_spans(doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    """int64 ``[batch * seq]``: flattened ``[start, end)`` of each token's document."""
    starts = document_starts(doc_ids).flatten()
    n = starts.numel()
    pos = torch.arange(n, device=doc_ids.device)
    start = torch.cummax(torch.where(starts, pos, 0), 0).values
    # a token closes its document when the next one opens a new one (or it is the last token)
    ends = torch.ones_like(starts)
    ends[:-1] = starts[1:]
    end = torch.where(ends, pos + 1, n).flip(0).cummin(0).values.flip(0)
    return start, end


def document_spans(doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    """int32 ``[batch, seq]`` ``(start, end)``: the positions *within the row* of the first
    token and one past the last token of each token's document (no host sync)."""
    b, s = doc_ids.shape
    if b * s == 0:
        empty = torch.empty((b, s), dtype=torch.int32, device=doc_ids.device)
        return empty, empty.clone()
    start, end = _flat_spans(doc_ids)
    row0 = (torch.arange(b, device=doc_ids.device) * s)[:, None]
    return ((start.view(b, s) - row0).to(torch.int32), (end.view(b, s) - row0).to(torch.int32))


def token_documents(doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    """int64 ``[batch * seq]`` ``(document, offset)`` of every flattened token: its document's
    index (into ``cu_seqlens``) and its position inside that document (no host sync)."""
    if doc_ids.numel() == 0:
        empty = torch.empty(0, dtype=torch.int64, device=doc_ids.device)
        return empty, empty.clone()
    starts = document_starts(doc_ids).flatten()
    start, _ = _flat_spans(doc_ids)
    doc = torch.cumsum(starts, 0) - 1
    return doc, torch.arange(starts.numel(), device=doc_ids.device) - start


def document_bounds(doc_ids: Tensor) -> tuple[Tensor, int]:
    """``(cu_seqlens, max_seqlen)`` of the documents over the flattened ``batch x seq`` tokens:
    ``cu_seqlens`` int32 ``[num_docs + 1]`` (document starts, then ``batch * seq``) on the ids'
    device; ``max_seqlen`` the longest document (one host sync)."""
    device = doc_ids.device
    n = doc_ids.numel()
    if n == 0:
        return torch.zeros(1, dtype=torch.int32, device=device), 0
    starts = document_starts(doc_ids).flatten()
    start, end = _flat_spans(doc_ids)
    num_docs, max_seqlen = (int(x) for x in torch.stack([starts.sum(), (end - start).max()]).tolist())
    doc = torch.cumsum(starts, 0) - 1  # nondecreasing: document d ends at #tokens with doc <= d
    ends = torch.searchsorted(doc, torch.arange(num_docs, device=device), right=True)
    cu = torch.cat([torch.zeros(1, dtype=ends.dtype, device=device), ends]).to(torch.int32)
    return cu, max_seqlen


def document_runs(doc_ids: Tensor) -> list[list[tuple[int, int]]]:
    """Per batch row, the ``[start, end)`` token ranges of its documents (one host sync)."""
    b, s = doc_ids.shape
    change = (doc_ids[:, 1:] != doc_ids[:, :-1]).cpu()
    runs = []
    for row in range(b):
        cuts = [0, *(change[row].nonzero().flatten() + 1).tolist(), s]
        runs.append(list(zip(cuts[:-1], cuts[1:], strict=True)))
    return runs
