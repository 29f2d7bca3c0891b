"""Packing: what a training row holds beyond its tokens.

``data.packing=concat`` (pretraining): a row is ``seq_len + 1`` consecutive tokens of the store, running across
document boundaries (each document ends with EOS), positions 0..seq_len-1, plain causal attention.

``data.packing=document``: the same windows, but every document in a row is on its own: positions restart at each
document's first token, attention never crosses a document (the model gets ``document_ids``: a block-diagonal
causal mask on CPU, FlexAttention's document mask on CUDA), and no token is a target of another document's token
(targets -100, which the loss ignores). The loss of a packed row is then the loss of its documents computed
alone (tests/unit/test_data_store.py checks it). A per-token loss mask stored beside the tokens (fine-tuning
formats) also turns targets into -100.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from framework.data.store import TokenBlocks

IGNORE = -100  # F.cross_entropy's ignore_index


@dataclass
class Batch:
    """Rows of ``seq_len + 1`` tokens; with document packing, each token's document and position."""

    tokens: torch.Tensor  # (B, T + 1) int64
    document_ids: torch.Tensor | None = None  # (B, T + 1) int64
    positions: torch.Tensor | None = None  # (B, T + 1) int64
    loss_mask: torch.Tensor | None = None  # (B, T + 1) bool: which tokens are targets

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:
        """Next tokens, -100 where a target is of another document than its input, or masked out."""
        tgt = self.tokens[:, 1:]
        keep = None
        if self.document_ids is not None:
            keep = self.document_ids[:, 1:] == self.document_ids[:, :-1]
        if self.loss_mask is not None:
            keep = self.loss_mask[:, 1:] if keep is None else keep & self.loss_mask[:, 1:]
        return tgt if keep is None else tgt.masked_fill(~keep, IGNORE)

    @property
    def kwargs(self) -> dict:
        """The model's keyword arguments besides the tokens."""
        if self.document_ids is None:
            return {}
        return {"positions": self.positions[:, :-1], "document_ids": self.document_ids[:, :-1]}

    def _map(self, fn) -> Batch:
        return Batch(*(None if t is None else fn(t) for t in (self.tokens, self.document_ids, self.positions,
                                                                 self.loss_mask)))

    def split(self, size: int) -> list[Batch]:
        n = self.tokens.shape[0]
        return [self._map(lambda t, i=i: t[i: i + size]) for i in range(0, n, size)]

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


def as_batch(rows) -> Batch:
    """What a loader returns (a tensor of rows, or a Batch) as a Batch."""
    return rows if isinstance(rows, Batch) else Batch(rows)


def document_layout(offsets: np.ndarray, starts: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(document index, position within the document's part of the window) of every token of the windows
    [start, start + width); a document cut by the window's start restarts at position 0 there."""
    idx = starts[:, None] + np.arange(width)[None, :]  # (B, W) token indices
    doc = np.searchsorted(offsets, idx, side="right") - 1  # (B, W)
    first = np.maximum(offsets[doc], starts[:, None])
    return doc, idx - first


class DocumentBlocks:
    """``TokenBlocks`` whose rows come as a ``Batch`` with each token's document and position (and loss mask)."""

    def __init__(self, blocks: TokenBlocks, packing: str):
        self.blocks, self.packing = blocks, packing
        self.offsets = np.asarray(blocks.source.offsets)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape

    def __getitem__(self, index) -> Batch:
        starts = self.blocks.starts(index)
        tokens = torch.from_numpy(self.blocks.window(self.blocks.source.tokens, starts).astype(np.int64))
        mask = self.blocks.source.arrays.get("mask")
        loss_mask = None if mask is None else torch.from_numpy(self.blocks.window(mask, starts).astype(bool))
        if self.packing != "document":
            return Batch(tokens, loss_mask=loss_mask)
        doc, pos = document_layout(self.offsets, starts, self.blocks.seq_len + 1)
        return Batch(tokens, torch.from_numpy(doc.astype(np.int64)), torch.from_numpy(pos.astype(np.int64)),
                     loss_mask)


def training_rows(blocks: TokenBlocks, packing: str):
    """What the loader draws from: plain token rows (concat packing, no loss mask) or Batches."""
    if packing == "concat" and "mask" not in blocks.source.arrays:
        return blocks
    return DocumentBlocks(blocks, packing)
