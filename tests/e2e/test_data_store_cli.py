"""The token store from the command line: ``framework.prepare`` then ``framework.train data.store=``, the tokenizer's
hash in every checkpoint, and a resume whose data would change the tokenizer refused in one line, nothing written."""

import json

import pytest

from tests.distributed.test_resume import tree_digest
from tests.helpers import TINY_TRAIN, assert_ok, error_lines, run_module

pytestmark = pytest.mark.e2e

TRAIN = [a for a in TINY_TRAIN if not a.startswith("checkpoint.")] + [
    "trainer.max_steps=4", "checkpoint.every=2", "checkpoint.export=false"]


def test_prepare_then_train_from_the_store(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"text": f"reverse: {' '.join(str((i * 7 + j) % 10) for j in range(6))}"} for i in range(1500)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "store"
    proc = run_module("framework.prepare", ["data=files", f"data.paths=[{corpus}]", "data.vocab_size=300",
                                            f"out={store}"])
    assert_ok(proc)
    meta = json.loads((store / "store.json").read_text())
    assert meta["documents"] == 1500 and meta["splits"]["val"]["documents"] == 30
    assert "[prepare]" in proc.stderr + proc.stdout
    run = tmp_path / "run"
    proc = run_module("framework.train", [*TRAIN, f"data.store={store}", f"run_dir={run}", "data.packing=document"])
    assert_ok(proc)
    assert f"store {store}" in proc.stderr and not (run / "data").exists()  # nothing prepared again
    state = json.loads((run / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["tokenizer_sha256"] == meta["tokenizer_sha256"]


def test_resume_with_changed_data_is_refused_and_nothing_is_written(tmp_path):
    run = tmp_path / "run"
    assert_ok(run_module("framework.train", [*TRAIN, f"run_dir={run}"]))
    before = tree_digest(run)
    proc = run_module("framework.train", [*TRAIN, f"run_dir={run}", "trainer.max_steps=6",
                                          "data.synthetic.num_examples=2500"])
    lines = error_lines(proc)
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert "was trained with tokenizer sha256" in lines[0] and f"data.tokenizer={run}/tokenizer" in lines[0]
    assert tree_digest(run) == before  # tokenizer, config, store and checkpoints as they were
    # the fix it names: the new data under the run's own tokenizer
    proc = run_module("framework.train", [*TRAIN, f"run_dir={run}", "trainer.max_steps=6",
                                          "data.synthetic.num_examples=2500", f"data.tokenizer={run}/tokenizer"])
    assert_ok(proc)
    assert "resumed from" in proc.stderr
