"""The token store: flat token files plus document indexes, memory-mapped by every rank.

Layout of a finished store (``python -m framework.prepare``, or run_dir/data when training prepares it)::

    store.json          tokens, documents, dtype, tokenizer_sha256, fingerprint, splits {train, val}, arrays
    tokenizer/          the tokenizer that made the tokens (Hugging Face format)
    train.bin           every training token, flat, uint16 (vocabulary <= 65536) or uint32
    train.idx.npy       int64 document offsets into train.bin: document i is tokens [idx[i], idx[i+1])
    val.bin, val.idx.npy   the held-out documents, likewise
    counts.npy          how often each token id occurs in train.bin (the unigram entropy, without a pass)

Each document ends with the tokenizer's EOS. A per-token array may sit beside the tokens under the same index
(``train.<name>.bin``, listed in ``arrays``), e.g. the loss mask of fine-tuning formats. Nothing is read into
memory: ranks ``np.memmap`` the files and a block is a slice (Megatron's ``.bin`` + ``.idx``, nanoGPT's memmap).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from framework.cli import UserError
from framework.data.encode import SPLITS, write_json_atomic  # noqa: F401 - the layout's names, re-exported

STORE_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def read_meta(store_dir: str) -> dict | None:
    """store.json of a finished store, or None."""
    path = os.path.join(store_dir, "store.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


class TokenSplit:
    """One split of a store, memory-mapped: ``tokens`` (N,), ``offsets`` (documents + 1,) and any extra arrays."""

    def __init__(self, store_dir: str, split: str, meta: dict):
        dtype = np.dtype(meta["dtype"])
        n = int(meta["splits"][split]["tokens"])
        self.tokens = _map(os.path.join(store_dir, f"{split}.bin"), dtype, n)
        self.offsets = np.load(os.path.join(store_dir, f"{split}.idx.npy"), mmap_mode="r")
        self.arrays = {name: _map(os.path.join(store_dir, f"{split}.{name}.bin"), np.dtype(dt), n)
                       for name, dt in meta.get("arrays", {}).items()}

    @property
    def documents(self) -> int:
        return len(self.offsets) - 1


def _map(path: str, dtype: np.dtype, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=dtype)
    size = os.path.getsize(path)
    if size != n * dtype.itemsize:
        raise UserError(f"{path} holds {size} bytes, not the {n} tokens its store.json lists: prepare the store again")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


class TokenBlocks:
    """Windows of ``seq_len + 1`` tokens over a split, one every ``seq_len`` tokens (each window's last token is the
    next one's first, so every token is a target once). Indexing gives int64 tensors (B, seq_len + 1): an int, a
    slice, or an index array/tensor (what the loader draws). Reads only the rows asked for."""

    def __init__(self, split: TokenSplit, seq_len: int):
        self.source, self.seq_len = split, seq_len
        self.n = max(0, (len(split.tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.seq_len + 1)

    def starts(self, index) -> np.ndarray:
        if isinstance(index, slice):
            rows = np.arange(*index.indices(self.n))
        else:
            rows = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
            if rows.size and (rows.min() < -self.n or rows.max() >= self.n):
                raise IndexError(f"block index out of range for {self.n} blocks")
            rows = rows % max(self.n, 1)
        return rows * self.seq_len

    def window(self, array: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """(len(starts), seq_len + 1) of ``array`` (a split's tokens or an array beside them)."""
        width = self.seq_len + 1
        out = np.empty((len(starts), width), dtype=array.dtype)
        for i, s in enumerate(starts):  # sorted reads would be faster on disk; a batch is small
            out[i] = array[s: s + width]
        return out

    def __getitem__(self, index) -> torch.Tensor:
        scalar = isinstance(index, (int, np.integer))
        rows = self.window(self.source.tokens, self.starts([index] if scalar else index))
        t = torch.from_numpy(rows.astype(np.int64))
        return t[0] if scalar else t

    # the two tensor methods the evaluators call on their blocks (framework/evaluation/perplexity.py)
    def split(self, batch_size: int):
        """Consecutive batches of ``batch_size`` rows, as ``Tensor.split`` gives."""
        for i in range(0, self.n, batch_size):
            yield self[i: i + batch_size]

    def max(self) -> int:
        stop = self.n * self.seq_len + 1 if self.n else 0
        return int(self.source.tokens[:stop].max()) if stop else 0


class TokenStore:
    """A finished store, opened read-only (memory-mapped)."""

    def __init__(self, store_dir: str):
        meta = read_meta(store_dir)
        if meta is None:
            raise UserError(f"{store_dir} is not a finished token store (no store.json): run "
                            f"`python -m framework.prepare data=<config> out={store_dir}`")
        if meta.get("version") != STORE_VERSION:
            raise UserError(f"{store_dir} is a token store of version {meta.get('version')}, this code reads "
                            f"{STORE_VERSION}: prepare it again")
        self.dir, self.meta = store_dir, meta
        self.train = TokenSplit(store_dir, "train", meta)
        self.val = TokenSplit(store_dir, "val", meta)

    @property
    def tokenizer_dir(self) -> str:
        return os.path.join(self.dir, "tokenizer")

    @property
    def tokenizer_sha256(self) -> str:
        return self.meta["tokenizer_sha256"]

    def unigram_entropy(self) -> float:
        """Nats per token of the training tokens' unigram distribution (from counts.npy)."""
        counts = np.load(os.path.join(self.dir, "counts.npy")).astype(np.float64)
        total = counts.sum()
        if total == 0:
            return 0.0
        p = counts[counts > 0] / total
        return float(-(p * np.log(p)).sum())


def describe(meta: dict) -> str:
    s = meta["splits"]
    return (f"{meta['tokens']:,} tokens in {meta['documents']:,} documents ({s['train']['tokens']:,} train / "
            f"{s['val']['tokens']:,} held out), {meta['dtype']}, tokenizer {meta['tokenizer_sha256'][:12]}")

