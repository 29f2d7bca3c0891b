"""Tokenizers: a local Hugging Face tokenizer directory, or a byte-level BPE trained on the corpus.

The trained tokenizer is saved in Hugging Face format (``tokenizer.json`` and friends) into the run, travels
into the export, and loads with ``AutoTokenizer.from_pretrained`` without any network.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style pre-tokenization) on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None)


def load_tokenizer(path: str):
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def save_tokenizer(tok, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    tok.save_pretrained(path)


def tokenizer_sha256(tok) -> str:
    """The identity of a tokenizer: sha256 of its serialized model (vocabulary, merges, normalizer, pre-tokenizer,
    added tokens) and its special tokens. Stable across save and load, unlike the bytes of its files."""
    blob = tok.backend_tokenizer.to_str() + "\0" + repr((tok.eos_token, tok.bos_token, tok.pad_token))
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenizer_dir_sha256(path: str) -> str:
    """``tokenizer_sha256`` of the tokenizer saved in ``path``."""
    return tokenizer_sha256(load_tokenizer(path))
