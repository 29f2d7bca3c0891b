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

import bisect
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
    def counts_selectively(self) -> bool:
        """Whether some targets are not counted (document boundaries, loss masks, padding): the loss then needs the
        global batch's count of those that are."""
        return self.document_ids is not None or self.loss_mask is not None

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


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Bins of item indices, each bin's lengths summing to at most ``capacity``: items longest first, each into
    the fullest bin it fits (TRL's and torchtune's packing). Deterministic: every rank computes the same bins."""
    order = np.argsort(-lengths, kind="stable")
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    bins: list[list[int]] = []
    for i in order:
        n = int(lengths[i])
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            bins.append([int(i)])
            bisect.insort(free, (capacity - n, len(bins) - 1))
        else:
            room, b = free.pop(j)
            bins[b].append(int(i))
            bisect.insort(free, (room - n, b))
    return [np.asarray(b, dtype=np.int64) for b in bins]


class PackedExamples:
    """Fine-tuning examples packed whole into rows of ``seq_len + 1`` tokens (best-fit decreasing), each example on
    its own: positions restart at its first token, attention and targets never cross into another example, the
    row's tail is padding that the loss ignores. An example longer than a row keeps its last ``seq_len + 1`` tokens
    (the answer and as much of the prompt as fits: cut from the prompt side), counted in ``truncated``."""

    def __init__(self, split, seq_len: int, pad_id: int):
        self.source, self.seq_len, self.pad_id = split, seq_len, pad_id
        width = seq_len + 1
        self.offsets = np.asarray(split.offsets, dtype=np.int64)
        lengths = np.diff(self.offsets)
        self.truncated = int((lengths > width).sum())
        self.kept = np.minimum(lengths, width)
        usable = np.flatnonzero(self.kept >= 2)  # an example needs an input and a target
        bins = best_fit_decreasing(self.kept[usable], width)
        self.bins = [usable[b] for b in bins]
        used = int(self.kept[usable].sum())
        self.fill = used / max(1, len(self.bins) * width)  # share of the rows' tokens that are not padding

    def __len__(self) -> int:
        return len(self.bins)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.bins), self.seq_len + 1)

    def _row(self, b: int) -> tuple[np.ndarray, ...]:
        width = self.seq_len + 1
        tokens = np.full(width, self.pad_id, dtype=np.int64)
        doc = np.full(width, len(self.bins[b]), dtype=np.int64)  # the padding is a document of its own
        pos = np.zeros(width, dtype=np.int64)
        mask = np.zeros(width, dtype=bool)
        at, loss = 0, self.source.arrays.get("mask")
        for d, e in enumerate(self.bins[b]):
            n = int(self.kept[e])
            lo, hi = self.offsets[e + 1] - n, self.offsets[e + 1]  # the example's last n tokens
            tokens[at: at + n] = self.source.tokens[lo:hi]
            mask[at: at + n] = True if loss is None else loss[lo:hi].astype(bool)
            doc[at: at + n], pos[at: at + n] = d, np.arange(n)
            at += n
        pos[at:] = np.arange(width - at)
        return tokens, doc, pos, mask

    def __getitem__(self, index) -> Batch:
        scalar = isinstance(index, (int, np.integer))
        if isinstance(index, slice):
            rows = range(*index.indices(len(self.bins)))
        else:
            rows = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
        parts = [self._row(int(b)) for b in rows]
        cols = [torch.from_numpy(np.stack(c)) if parts else torch.zeros(0, self.seq_len + 1, dtype=torch.int64)
                for c in zip(*parts)] if parts else [torch.zeros(0, self.seq_len + 1, dtype=torch.int64)] * 4
        batch = Batch(cols[0], cols[1], cols[2], cols[3].bool())
        return batch._map(lambda t: t[0]) if scalar else batch


def resolve_packing(cfg) -> str:
    """data.packing, or its default: document for the fine-tuning formats, concat for text."""
    return cfg.packing or ("concat" if cfg.format == "text" else "document")


def training_rows(blocks: TokenBlocks, packing: str, pad_id: int = 0):
    """What the loader draws from: plain token rows (concat packing, no loss mask), windows as Batches, or whole
    fine-tuning examples packed into rows (document packing of a store with a loss mask)."""
    if packing == "concat" and "mask" not in blocks.source.arrays:
        return blocks
    if packing == "document" and "mask" in blocks.source.arrays:
        return PackedExamples(blocks.source, blocks.seq_len, pad_id)
    return DocumentBlocks(blocks, packing)
