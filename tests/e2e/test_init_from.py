"""``trainer.init_from``: the model's shape is the Hugging Face config's (not the flavor's), its tokenizer the
directory's own, and a tokenizer that does not index the embedding is refused in one line."""

import json

import pytest
import torch

from tests.helpers import TINY_TRAIN, assert_ok, error_lines, make_hf_model, run_module

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from framework.data.synthetic import make_examples

    path = tmp_path_factory.mktemp("hf")
    # its tokenizer was trained on other text than the run's corpus: a fresh BPE of the corpus differs from it
    make_hf_model(str(path), n_layers=2, vocab_texts=[e.text for e in make_examples("sort", 500, 1, 3, 8)])
    return path


@pytest.mark.parametrize("nproc,layout", [(1, []), (2, ["parallel.tp=2"]), (2, ["parallel.zero_stage=3"])],
                         ids=["one", "tp2", "zero3-dp2"])
def test_init_from_takes_weights_shape_and_tokenizer_from_the_hf_directory(hf_dir, tmp_path, nproc, layout):
    """Also where each rank reads only its slice of every tensor: its tensor-parallel shards, its ZeRO-3 rows."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    # the flavor (debug: dim 64, ffn 192) is not the HF model's (ffn 128, vocab ~300): the HF config wins
    args = [a for a in TINY_TRAIN if a != "checkpoint.export=false"]
    proc = run_module("framework.train", [*args, f"run_dir={tmp_path}", f"trainer.init_from={hf_dir}",
                                          "trainer.max_steps=2", "trainer.lr=0", "trainer.weight_decay=0", *layout],
                      nproc=nproc)
    assert_ok(proc)
    ours, theirs = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer")), AutoTokenizer.from_pretrained(str(hf_dir))
    assert ours.get_vocab() == theirs.get_vocab()
    # lr 0: the export is the HF model's weights, bitwise
    exported = {k: v for f in (tmp_path / "export").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    source = load_file(str(hf_dir / "model.safetensors"))
    assert exported.keys() == source.keys() and all(torch.equal(exported[k], source[k]) for k in source)
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["intermediate_size"] == 128 and cfg["vocab_size"] == len(theirs)


def test_init_from_checks_seq_len_against_the_hf_model(hf_dir, tmp_path):
    # the debug flavor's context is 512, the HF model's 256
    proc = run_module("framework.train", [*TINY_TRAIN, f"run_dir={tmp_path}", f"trainer.init_from={hf_dir}",
                                          "trainer.seq_len=300"])
    lines = error_lines(proc)
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert "trainer.seq_len=300 exceeds the context of 256 tokens" in lines[0] and str(hf_dir) in lines[0]
    assert not (tmp_path / "config.yaml").exists()


def test_init_from_refuses_a_tokenizer_larger_than_the_embedding(hf_dir, tmp_path):
    from framework.data.synthetic import make_examples
    from framework.data.tokenizer import save_tokenizer, train_bpe

    texts = [e.text for task in ("add", "copy") for e in make_examples(task, 300, 2, 3, 8)]
    texts += [open(torch.__file__).read(), open(json.__file__).read()]
    other = train_bpe(texts, 1000)
    rows = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    assert len(other) > rows
    save_tokenizer(other, str(tmp_path / "tok"))
    proc = run_module("framework.train", [*TINY_TRAIN, f"run_dir={tmp_path}/run", f"trainer.init_from={hf_dir}",
                                          f"data.tokenizer={tmp_path}/tok"])
    lines = error_lines(proc)
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert f"has {len(other)} tokens but the embedding" in lines[0] and f"has {rows} rows" in lines[0]
