"""A run's data: its token store (``data.store``, or prepared into ``run_dir/data``) opened as token blocks.

Without ``data.store`` rank 0 prepares the store (``framework.data.prepare``) while the other ranks wait on the
store's files, not in a collective, so a long build never meets the collective timeout. Every rank then
memory-maps the store; the tokenizer that made it is copied to ``run_dir/tokenizer``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from framework.cli import UserError
from framework.config import DataConfig
from framework.data.packing import PackedExamples, resolve_packing, training_rows
from framework.data.prepare import build_store, fingerprint
from framework.data.store import TokenBlocks, TokenStore, describe, read_meta
from framework.data.synthetic import Example, make_examples
from framework.data.tokenizer import load_tokenizer, tokenizer_dir_sha256
from framework.parallel.distributed import barrier

WAIT_POLL_S = 0.5


@dataclass
class TokenData:
    train: Any  # the rows the loader draws: TokenBlocks / DocumentBlocks over the store (a tensor in unit tests)
    val: Any  # TokenBlocks of the held-out documents: int64 (B, seq_len + 1) tensors by index or slice
    tokenizer: object
    unigram_entropy: float  # nats per token of the training tokens
    eval_examples: list[Example]  # synthetic held-out prompts with answers ([] otherwise)
    store: TokenStore | None = None
    tokenizer_sha256: str | None = None
    meta: dict = field(default_factory=dict)
    fine_tuning: bool = False  # the store has a loss mask (prompt/completion, messages, alpaca)


def run_store_dir(cfg: DataConfig, run_dir: str) -> str:
    return cfg.store or os.path.join(run_dir, "data")


def planned_tokenizer(cfg: DataConfig, seed: int, run_dir: str) -> tuple[str, int] | None:
    """(sha256, vocabulary size) of the tokenizer this data config gives the run, known without building
    anything; None when it would train a new BPE (the run's store is of another data config, or missing)."""
    if cfg.store:
        meta = read_meta(cfg.store)
        return meta["tokenizer_sha256"], int(meta["vocab_size"])
    if cfg.tokenizer:
        return tokenizer_dir_sha256(cfg.tokenizer), len(load_tokenizer(cfg.tokenizer))
    store_dir = run_store_dir(cfg, run_dir)
    fp = fingerprint(cfg, seed)
    for name in ("store.json", "build.json"):  # a finished store, or one half-built (its tokenizer is made)
        path = os.path.join(store_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                meta = json.load(f)
            if meta.get("fingerprint") == fp:
                return meta["tokenizer_sha256"], int(meta["vocab_size"])
    return None


def wait_for_store(store_dir: str, fp: str, error_path: str) -> None:
    """Every rank but 0: wait on the files until rank 0 has finished the store (or failed, saying why)."""
    while True:
        meta = read_meta(store_dir)
        if meta is not None and meta.get("fingerprint") == fp:
            return
        if os.path.isfile(error_path):
            with open(error_path) as f:
                err = json.load(f)
            if err.get("fingerprint") == fp:
                raise UserError(err["message"])
        time.sleep(WAIT_POLL_S)


def ensure_run_store(cfg: DataConfig, seed: int, store_dir: str, is_rank0: bool) -> None:
    """Rank 0 builds (or resumes, or reuses) the store; the others wait on its files, outside any collective."""
    fp = fingerprint(cfg, seed)
    error_path = store_dir.rstrip("/") + ".error.json"
    if is_rank0 and os.path.exists(error_path):
        os.remove(error_path)
    barrier()  # short: no rank reads a failure of an earlier attempt
    if not is_rank0:
        return wait_for_store(store_dir, fp, error_path)
    try:
        build_store(cfg, store_dir, seed, progress=True)
    except BaseException as e:
        message = str(e) if isinstance(e, UserError) else f"preparing the data failed on rank 0: {type(e).__name__}: {e}"
        with open(error_path, "w") as f:
            json.dump({"fingerprint": fp, "message": message}, f)
        raise


def install_tokenizer(src: str, run_dir: str, sha: str) -> None:
    """Copy the store's tokenizer to run_dir/tokenizer (atomically; kept when it is already that one)."""
    dst = os.path.join(run_dir, "tokenizer")
    if os.path.isfile(os.path.join(dst, "tokenizer.json")) and tokenizer_dir_sha256(dst) == sha:
        return
    tmp = f"{dst}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def check_store_tokenizer(cfg: DataConfig, store: TokenStore) -> None:
    """A store made with another tokenizer than the one the config names (init_from's, data.tokenizer) is refused."""
    if cfg.tokenizer and cfg.store:
        sha = tokenizer_dir_sha256(cfg.tokenizer)
        if sha != store.tokenizer_sha256:
            raise UserError(f"data.store={cfg.store} was tokenized by another tokenizer (sha256 "
                            f"{store.tokenizer_sha256[:12]}) than {cfg.tokenizer} ({sha[:12]}): prepare the store with "
                            f"data.tokenizer={cfg.tokenizer}")


def prepare_data(cfg: DataConfig, seq_len: int, seed: int, run_dir: str, is_rank0: bool) -> TokenData:
    """The run's token store, built by rank 0 if needed, memory-mapped by every rank; blocks of ``seq_len + 1``."""
    store_dir = run_store_dir(cfg, run_dir)
    if not cfg.store:
        ensure_run_store(cfg, seed, store_dir, is_rank0)
    store = TokenStore(store_dir)
    check_store_tokenizer(cfg, store)
    if is_rank0:
        os.makedirs(run_dir, exist_ok=True)
        install_tokenizer(store.tokenizer_dir, run_dir, store.tokenizer_sha256)
    train = TokenBlocks(store.train, seq_len)
    if len(train) == 0:
        raise UserError(f"the corpus is shorter than one block of {seq_len + 1} tokens: add data or lower trainer.seq_len")
    examples = []
    if cfg.source == "synthetic" and not cfg.mixture:
        s = cfg.synthetic
        examples = make_examples(s.task, s.val_examples, seed + 10_007, s.min_len, s.max_len)
    tokenizer = load_tokenizer(store.tokenizer_dir)
    packing = resolve_packing(cfg)
    rows = training_rows(train, packing, pad_id=tokenizer.pad_token_id or 0)
    # held-out rows are built like the training rows: masked and packed the same way
    val = training_rows(TokenBlocks(store.val, seq_len), packing, pad_id=tokenizer.pad_token_id or 0)
    if isinstance(rows, PackedExamples) and rows.truncated and is_rank0:
        print(f"[miaotui] {rows.truncated} training examples are longer than trainer.seq_len + 1 = {seq_len + 1} "
              "tokens: each keeps its last tokens (its prompt is cut)", file=sys.stderr, flush=True)
    return TokenData(train=rows, val=val, tokenizer=tokenizer, unigram_entropy=store.unigram_entropy(),
                     eval_examples=examples or heldout_examples(store, tokenizer), store=store,
                     tokenizer_sha256=store.tokenizer_sha256, meta=store.meta, fine_tuning="mask" in store.train.arrays)


def heldout_examples(store: TokenStore, tokenizer, limit: int = 512) -> list[Example]:
    """Fine-tuning stores: (prompt, answer) of held-out examples, read back from their tokens and loss mask: the
    prompt is everything before the first counted token, the answer the counted tokens up to the end of that turn
    (its EOS). Scored by exact match of the greedy answer (``trainer.eval_generate``)."""
    split, mask = store.val, store.val.arrays.get("mask")
    if mask is None:
        return []
    eos, out = tokenizer.eos_token_id, []
    for e in range(min(split.documents, limit)):
        lo, hi = int(split.offsets[e]), int(split.offsets[e + 1])
        counted = np.flatnonzero(np.asarray(mask[lo:hi]))
        if not len(counted) or counted[0] == 0:
            continue
        ids = np.asarray(split.tokens[lo:hi]).tolist()
        start = int(counted[0])
        end = ids.index(eos, start) if eos in ids[start:] else hi - lo
        out.append(Example(prompt=tokenizer.decode(ids[:start]), answer=tokenizer.decode(ids[start:end])))
    return out


def describe_store(data: TokenData) -> str:
    return describe(data.meta) if data.meta else ""


def tokenize_and_pack(texts, tok, seq_len: int, num_proc: int | None = None) -> torch.Tensor:
    """A small in-memory sample (calibration text): EOS after each document, packed into (N, seq_len + 1) blocks.
    Corpora for training go through the token store instead."""
    del num_proc  # a sample this small is encoded in one call (the tokenizer's own threads)
    eos = tok.eos_token_id
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    flat = torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.int64)
    n = flat.numel() // (seq_len + 1)
    return flat[: n * (seq_len + 1)].view(n, seq_len + 1)


def unigram_entropy(blocks: torch.Tensor, vocab_size: int) -> float:
    counts = torch.bincount(blocks.flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))

