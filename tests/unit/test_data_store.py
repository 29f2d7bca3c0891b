"""The token store: every token and document boundary of a prepared corpus against a direct tokenization, resume of
a half-built store, the memory-mapped loader's exact resume, sources (globs, Parquet, local hub streaming,
mixtures), and document packing's loss against each document's own."""

import json
import os

import numpy as np
import pytest
import torch

from framework.config import DataConfig, MixtureSource, PrepareConfig
from framework.data import prepare as prep
from framework.data.loader import ShardedLoader
from framework.data.packing import Batch, DocumentBlocks, as_batch, document_layout
from framework.data.sources import iter_documents
from framework.data.store import TokenBlocks, TokenStore
from framework.data.tokenizer import load_tokenizer, save_tokenizer, tokenizer_dir_sha256, train_bpe
from framework.prepare import prepare


def corpus_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "x", "=", "(", ")", "\n", "42", "é", "数据"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 120)))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    save_tokenizer(train_bpe(corpus_texts(200, seed=1), 300), path)
    return path


@pytest.fixture
def corpus(tmp_path):
    """Three files (JSONL, Parquet, text) in a directory, and the documents they hold, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = corpus_texts(400)
    d = tmp_path / "corpus"
    d.mkdir()
    with open(d / "a.jsonl", "w") as f:
        for t in texts[:300]:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
    pq.write_table(pa.table({"text": texts[300:399]}), d / "b.parquet")
    (d / "c.txt").write_text(texts[399])
    return str(d), texts


def direct_tokens(tok_dir: str, texts: list[str]) -> list[list[int]]:
    tok = load_tokenizer(tok_dir)
    return [ids + [tok.eos_token_id] for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def split_docs(store: TokenStore, split: str) -> list[list[int]]:
    s = getattr(store, split)
    return [s.tokens[a:b].tolist() for a, b in zip(s.offsets[:-1], s.offsets[1:])]


def test_store_holds_every_token_and_document_boundary(corpus, tok_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_CHARS", 4000)  # many chunks, through two worker processes
    path, texts = corpus
    out = str(tmp_path / "store")
    data = DataConfig(source="files", paths=[path], tokenizer=tok_dir, num_proc=2, val_fraction=0.1)
    meta = prepare(PrepareConfig(data=data, out=out, seed=3, progress=False))
    store = TokenStore(out)
    expected = direct_tokens(tok_dir, texts)
    val_rule = [prep.held_out(i, 0.1, 3) for i in range(len(texts))]
    assert split_docs(store, "train") == [d for d, v in zip(expected, val_rule) if not v]
    assert split_docs(store, "val") == [d for d, v in zip(expected, val_rule) if v]
    assert meta["documents"] == len(texts) and sum(val_rule) == 40 == meta["splits"]["val"]["documents"]
    assert meta["tokens"] == sum(map(len, expected)) and meta["dtype"] == "uint16"
    assert meta["tokenizer_sha256"] == tokenizer_dir_sha256(tok_dir) == tokenizer_dir_sha256(os.path.join(out, "tokenizer"))
    assert not os.path.exists(os.path.join(out, "chunks"))
    # the counts behind the unigram entropy are the training tokens'
    counts = np.load(os.path.join(out, "counts.npy"))
    assert counts.sum() == meta["splits"]["train"]["tokens"]
    # a second run finds it finished; another data config is refused rather than overwritten
    assert prepare(PrepareConfig(data=data, out=out, seed=3, progress=False)) == meta
    from framework.cli import UserError

    with pytest.raises(UserError, match="holds a token store of another data config"):
        prepare(PrepareConfig(data=data, out=out, seed=4, progress=False))


def test_half_built_store_resumes_without_redoing_finished_chunks(corpus, tok_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_CHARS", 4000)
    path, _ = corpus
    data = DataConfig(source="files", paths=[path], tokenizer=tok_dir, num_proc=1)
    whole = str(tmp_path / "whole")
    prep.build_store(data, whole, 0, progress=False)
    real, calls = prep.encode_chunk, []

    def dies_at_chunk_3(*args):
        k = args[5]
        calls.append(k)
        if k == 3:
            raise KeyboardInterrupt  # the build is killed here
        return real(*args)

    out = str(tmp_path / "half")
    monkeypatch.setattr(prep, "encode_chunk", dies_at_chunk_3)
    with pytest.raises(KeyboardInterrupt):
        prep.build_store(data, out, 0, progress=False)
    assert sorted(f for f in os.listdir(os.path.join(out, "chunks")) if f.endswith(".json")) == \
        ["000000.json", "000001.json", "000002.json"]
    calls.clear()
    monkeypatch.setattr(prep, "encode_chunk", real)
    monkeypatch.setattr(prep, "encode_chunk", lambda *a: calls.append(a[5]) or real(*a))
    prep.build_store(data, out, 0, progress=False)
    assert calls and min(calls) == 3  # chunks 0-2 were kept
    for name in ("train.bin", "train.idx.npy", "val.bin", "val.idx.npy", "counts.npy"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(whole, name), "rb").read(), name


def small_store(tmp_path, tok_dir, n_docs=300) -> TokenStore:
    texts = corpus_texts(n_docs)
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = str(tmp_path / "store")
    prep.build_store(DataConfig(source="files", paths=[str(f)], tokenizer=tok_dir, num_proc=1), out, 0, progress=False)
    return TokenStore(out)


def test_memmap_blocks_and_loader_resume_exactly(tmp_path, tok_dir):
    store = small_store(tmp_path, tok_dir)
    seq = 16
    blocks = TokenBlocks(store.train, seq)
    assert isinstance(store.train.tokens, np.memmap)
    assert len(blocks) == (len(store.train.tokens) - 1) // seq
    tokens = torch.from_numpy(np.asarray(store.train.tokens, dtype=np.int64))
    assert torch.equal(blocks[5], tokens[5 * seq: 6 * seq + 1])
    assert torch.equal(blocks[torch.tensor([7, 2])], torch.stack([tokens[7 * seq: 8 * seq + 1], tokens[2 * seq: 3 * seq + 1]]))
    assert torch.equal(blocks[2:4], torch.stack([tokens[2 * seq: 3 * seq + 1], tokens[3 * seq: 4 * seq + 1]]))
    n_batches = len(blocks) // 8 + 3  # crosses an epoch
    single = ShardedLoader(blocks, 8, 1, 0, seed=1)
    shards = [ShardedLoader(blocks, 8, 2, r, seed=1) for r in range(2)]
    for _ in range(n_batches):
        full = single.next_batch()
        assert torch.equal(torch.cat([s.next_batch() for s in shards]), full)
    assert single.epoch == 1
    state = single.state_dict()
    nxt = [single.next_batch() for _ in range(3)]
    again = ShardedLoader(TokenBlocks(TokenStore(store.dir).train, seq), 8, 1, 0, seed=1)
    again.load_state_dict(state)
    assert all(torch.equal(again.next_batch(), b) for b in nxt)


def test_document_layout_restarts_positions_and_masks_cross_document_targets():
    offsets = np.array([0, 3, 5, 9, 20])
    doc, pos = document_layout(offsets, np.array([0, 4]), 6)
    assert doc.tolist() == [[0, 0, 0, 1, 1, 2], [1, 2, 2, 2, 2, 3]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 0]]
    b = Batch(torch.arange(12).view(2, 6), torch.from_numpy(doc), torch.from_numpy(pos))
    assert b.targets.tolist() == [[1, 2, -100, 4, -100], [-100, 8, 9, 10, -100]]
    assert as_batch(torch.zeros(2, 3)).kwargs == {}


def test_packed_loss_equals_each_document_alone():
    from framework.models.llama import ModelArgs, build_model
    from framework.trainer.evaluate import lm_loss

    torch.manual_seed(0)
    model = build_model(ModelArgs(vocab_size=50, n_layers=2, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64), seed=0)
    lengths = [[5, 9, 3, 7], [12, 4, 8]]  # two rows of 24 tokens: whole documents
    docs = [[torch.randint(0, 50, (n,)) for n in row] for row in lengths]
    tokens = torch.stack([torch.cat(row) for row in docs])  # (2, 24)
    doc_ids, pos = [], []
    for row in lengths:
        offsets = np.concatenate([[0], np.cumsum(row)])
        d, p = document_layout(offsets, np.array([0]), int(offsets[-1]))
        doc_ids.append(torch.from_numpy(d[0]))
        pos.append(torch.from_numpy(p[0]))
    batch = Batch(tokens, torch.stack(doc_ids), torch.stack(pos))
    packed = lm_loss(model(batch.inputs, **batch.kwargs), batch.targets)
    total, count = 0.0, 0
    for row in docs:
        for d in row:
            logits = model(d[None, :-1])
            total += torch.nn.functional.cross_entropy(logits[0], d[1:], reduction="sum").item()
            count += len(d) - 1
    assert abs(packed.item() - total / count) < 1e-5
    # without the document mask the same rows give another loss: the mask is what makes them independent
    concat = lm_loss(model(batch.inputs), batch.targets)
    assert abs(concat.item() - total / count) > 1e-3


def test_document_blocks_of_a_store_carry_positions(tmp_path, tok_dir):
    store = small_store(tmp_path, tok_dir, n_docs=50)
    rows = DocumentBlocks(TokenBlocks(store.train, 32), "document")
    b = rows[torch.tensor([3])]
    starts = 3 * 32 + np.arange(33)
    doc = np.searchsorted(store.train.offsets, starts, side="right") - 1
    assert b.document_ids[0].tolist() == doc.tolist()
    firsts = np.maximum(store.train.offsets[doc], 3 * 32)
    assert b.positions[0].tolist() == (starts - firsts).tolist()
    assert set(b.split(1)[0].kwargs) == {"positions", "document_ids"}


def test_sources_globs_max_chars_local_hub_and_mixture(tmp_path):
    for name, rows in (("a", ["one", "two"]), ("b", ["three"])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"body": r}) + "\n" for r in rows))
    glob_cfg = DataConfig(source="files", paths=[str(tmp_path / "*.jsonl")], text_field="body")
    assert [t for t, _ in iter_documents(glob_cfg, 0)] == ["one", "two", "three"]
    glob_cfg.max_chars = 5
    assert [t for t, _ in iter_documents(glob_cfg, 0)] == ["one", "tw"]
    hub = DataConfig(source="hub", hub_name=str(tmp_path), text_field="body")  # datasets streaming, local files
    assert sorted(t for t, _ in iter_documents(hub, 0)) == ["one", "three", "two"]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": "x" * 100}) + "\n" for _ in range(30)))
    mixed = DataConfig(mixture=[MixtureSource(source="files", paths=[str(tmp_path / "big.jsonl")], weight=3.0),
                                MixtureSource(source="synthetic", weight=1.0)])
    docs = [t for t, _ in iter_documents(mixed, 0)]
    # by characters, 3 : 1, until the file runs out (30 documents of 100)
    file_chars = sum(len(t) for t in docs if t.startswith("x"))
    synth_chars = sum(len(t) for t in docs if not t.startswith("x"))
    assert file_chars == 3000 and synth_chars == pytest.approx(1000, abs=40)


@pytest.mark.cuda
def test_flex_document_mask_matches_the_sdpa_mask_on_cuda():
    """On CUDA the document mask is FlexAttention's block mask: the same logits as SDPA with the boolean mask."""
    from framework.models.llama import ModelArgs, build_model, document_mask

    device = torch.device("cuda")
    model = build_model(ModelArgs(vocab_size=64, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128), device=device)
    offsets = np.array([0, 37, 100, 101, 180, 256])
    doc, pos = document_layout(offsets, np.array([0, 0]), 256)
    doc, pos = torch.from_numpy(doc).to(device), torch.from_numpy(pos).to(device)
    x = torch.randint(0, 64, (2, 256), device=device)
    flex = model(x, positions=pos, document_ids=doc)
    sdpa = model(x, positions=pos, mask=document_mask(doc.cpu()).to(device))
    assert not isinstance(document_mask(doc), torch.Tensor)  # the FlexAttention path was taken
    torch.testing.assert_close(flex, sdpa, atol=2e-4, rtol=2e-4)


def test_a_store_of_another_tokenizer_is_refused(tmp_path, tok_dir):
    """init_from sets data.tokenizer to the model's own: a store tokenized by another tokenizer is refused."""
    from framework.cli import UserError
    from framework.data.dataset import prepare_data

    store = small_store(tmp_path, tok_dir, n_docs=100)
    other = str(tmp_path / "other")
    save_tokenizer(train_bpe(corpus_texts(100, seed=5), 280), other)
    with pytest.raises(UserError, match="was tokenized by another tokenizer"):
        prepare_data(DataConfig(store=store.dir, tokenizer=other), 16, 0, str(tmp_path / "run"), is_rank0=True)
    data = prepare_data(DataConfig(store=store.dir, tokenizer=tok_dir), 16, 0, str(tmp_path / "run"), is_rank0=True)
    assert data.tokenizer_sha256 == tokenizer_dir_sha256(str(tmp_path / "run" / "tokenizer")) == store.tokenizer_sha256
