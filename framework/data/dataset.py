"""From corpus to fixed-length token blocks, built once by rank 0 and shared through the run directory.

corpus -> tokenizer (trained or loaded) -> ``datasets.map`` tokenization (parallel) -> packing into blocks of
``seq_len + 1`` tokens -> a train/validation split, saved as ``run_dir/data/blocks.safetensors`` that every rank
memory-maps. The tokenizer goes to ``run_dir/tokenizer``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save_file

from framework.config import DataConfig
from framework.data.sources import load_corpus
from framework.data.synthetic import Example, make_examples
from framework.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe
from framework.parallel.distributed import barrier


@dataclass
class TokenData:
    train: torch.Tensor  # (N, seq_len + 1) int64
    val: torch.Tensor  # (M, seq_len + 1) int64
    tokenizer: object
    unigram_entropy: float  # nats per token of the training tokens
    eval_examples: list[Example]  # synthetic held-out prompts with answers ([] otherwise)


def _fingerprint(cfg: DataConfig, seq_len: int, seed: int) -> str:
    blob = json.dumps({"data": asdict(cfg), "seq_len": seq_len, "seed": seed, "v": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenize_and_pack(texts, tok, seq_len: int, num_proc: int) -> torch.Tensor:
    """Tokenize with ``datasets.map`` (EOS after each document) and pack into (N, seq_len + 1) blocks."""
    eos = tok.eos_token_id

    def encode(batch):
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] for x in ids]}

    nproc = num_proc if len(texts) >= 64 * max(num_proc, 1) else None
    ids = texts.map(encode, batched=True, remove_columns=texts.column_names, num_proc=nproc)
    flat = torch.tensor([t for doc in ids["ids"] for t in doc], dtype=torch.int64)
    n = flat.numel() // (seq_len + 1)
    return flat[: n * (seq_len + 1)].view(n, seq_len + 1)


def unigram_entropy(blocks: torch.Tensor, vocab_size: int) -> float:
    counts = torch.bincount(blocks.flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def _build(cfg: DataConfig, seq_len: int, seed: int, run_dir: str) -> None:
    train_texts, val_texts = load_corpus(cfg, seed)
    tok_dir = os.path.join(run_dir, "tokenizer")
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    else:
        tok = train_bpe((t for t in train_texts["text"]), cfg.vocab_size)
    save_tokenizer(tok, tok_dir)
    train = tokenize_and_pack(train_texts, tok, seq_len, cfg.num_proc)
    if val_texts is not None:
        val = tokenize_and_pack(val_texts, tok, seq_len, cfg.num_proc)
    else:
        # Hold out a seeded random subset of blocks.
        perm = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(round(train.shape[0] * cfg.val_fraction)))
        val, train = train[perm[:n_val]], train[perm[n_val:]]
    os.makedirs(os.path.join(run_dir, "data"), exist_ok=True)
    tmp = os.path.join(run_dir, "data", "blocks.safetensors.tmp")
    save_file({"train": train.contiguous(), "val": val.contiguous()}, tmp,
              metadata={"fingerprint": _fingerprint(cfg, seq_len, seed), "vocab_size": str(len(tok))})
    os.replace(tmp, os.path.join(run_dir, "data", "blocks.safetensors"))


def _cached(path: str, fingerprint: str) -> bool:
    if not os.path.isfile(path):
        return False
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("fingerprint") == fingerprint


def cached_vocab_size(cfg: DataConfig, seq_len: int, seed: int, run_dir: str) -> int | None:
    """The vocabulary of the run's token blocks if they exist for this data config (read without building
    anything), else None."""
    path = os.path.join(run_dir, "data", "blocks.safetensors")
    if not _cached(path, _fingerprint(cfg, seq_len, seed)):
        return None
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        vocab = (f.metadata() or {}).get("vocab_size")
    return int(vocab) if vocab else None


def prepare_data(cfg: DataConfig, seq_len: int, seed: int, run_dir: str, is_rank0: bool) -> TokenData:
    """Rank 0 builds (or reuses) the blocks and tokenizer; every rank then loads the same files."""
    path = os.path.join(run_dir, "data", "blocks.safetensors")
    if is_rank0 and not _cached(path, _fingerprint(cfg, seq_len, seed)):
        _build(cfg, seq_len, seed, run_dir)
    barrier()
    blocks = load_file(path)
    tok = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    examples = []
    if cfg.source == "synthetic":
        s = cfg.synthetic
        examples = make_examples(s.task, s.val_examples, seed + 10_007, s.min_len, s.max_len)
    if blocks["train"].shape[0] == 0:
        from framework.cli import UserError

        raise UserError(f"the corpus is shorter than one block of {seq_len + 1} tokens: add data or lower trainer.seq_len")
    return TokenData(train=blocks["train"], val=blocks["val"], tokenizer=tok,
                     unigram_entropy=unigram_entropy(blocks["train"], len(tok)), eval_examples=examples)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
