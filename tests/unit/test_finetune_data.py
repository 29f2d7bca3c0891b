"""Fine-tuning rows in the token store: loss masks, whole examples packed best-fit-decreasing, and the loss of a
packed batch against each example's own loss computed alone."""

import json

import numpy as np
import torch

from framework.config import DataConfig
from framework.data.formats import encode_example
from framework.data.packing import PackedExamples, best_fit_decreasing
from framework.data.prepare import build_store, held_out
from framework.data.store import TokenStore
from framework.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt": "digits: " + " ".join(str(d) for d in rng.integers(0, 10, int(rng.integers(1, 30)))) + " =",
             "completion": " " + " ".join(rng.choice(["yes", "no", "maybe"], int(rng.integers(1, 4))))}
            for _ in range(n)]


def _store(tmp_path, rows, fmt="prompt_completion", **kw) -> TokenStore:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok_dir = str(tmp_path / "tok")
    save_tokenizer(train_bpe([r["prompt"] + r["completion"] for r in rows], 300), tok_dir)
    cfg = DataConfig(source="files", paths=[str(path)], format=fmt, tokenizer=tok_dir, val_fraction=0.1, **kw)
    build_store(cfg, str(tmp_path / "store"), seed=0, progress=False)
    return TokenStore(str(tmp_path / "store"))


def test_store_holds_each_example_and_its_mask(tmp_path):
    rows = _rows(120)
    store = _store(tmp_path, rows)
    tok = load_tokenizer(store.tokenizer_dir)
    train = [r for i, r in enumerate(rows) if not held_out(i, 0.1, 0)]
    split, mask = store.train, store.train.arrays["mask"]
    assert split.documents == len(train)
    for e, row in enumerate(train):
        lo, hi = split.offsets[e], split.offsets[e + 1]
        ids, m = encode_example(row, "prompt_completion", tok, train_on_prompt=False)
        assert split.tokens[lo:hi].tolist() == ids and mask[lo:hi].tolist() == m


def test_best_fit_decreasing_fills_bins():
    lengths = np.array([7, 3, 5, 2, 8, 1, 4, 6])
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b.tolist()) == list(range(8))
    assert all(lengths[b].sum() <= 10 for b in bins)
    assert len(bins) == 4  # 36 tokens in bins of 10: the fewest possible


def test_packed_rows_equal_each_example_alone(tmp_path):
    from framework.models.llama import ModelArgs, build_model
    from framework.trainer.loss import lm_loss

    rows = _rows(60, seed=3)
    rows[0]["prompt"] = "digits: " + "1 " * 80 + "="  # longer than a row: its prompt is cut
    store = _store(tmp_path, rows)
    packed = PackedExamples(store.train, seq_len=48, pad_id=0)
    assert packed.truncated == 1 and packed.fill > 0.8
    model = build_model(ModelArgs(vocab_size=300, n_layers=2, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64), seed=0)
    batch = packed[torch.arange(len(packed))]
    loss = lm_loss(model(batch.inputs, **batch.kwargs), batch.targets)
    total, count = 0.0, 0
    split, mask = store.train, store.train.arrays["mask"]
    for e in range(split.documents):  # every example alone, unpadded, its counted targets only
        lo, hi = split.offsets[e], split.offsets[e + 1]
        lo = max(lo, hi - 49)  # the kept tail of a long one
        ids = torch.from_numpy(split.tokens[lo:hi].astype(np.int64))
        m = torch.from_numpy(mask[lo:hi].astype(bool))
        tgt = ids[1:].masked_fill(~m[1:], -100)
        logits = model(ids[None, :-1])[0]
        total += torch.nn.functional.cross_entropy(logits, tgt, reduction="sum", ignore_index=-100).item()
        count += int(m[1:].sum())
    assert int((batch.targets != -100).sum()) == count
    assert abs(loss.item() - total / count) < 1e-5
