"""Supervised fine-tuning end to end: the loss on the answer only, chat data, the chat template through the export
to transformers and the server.

Prompts of random digits with a fixed completion: with the prompt masked the loss ends near 0 (the answer is
always the same); trained on the prompt too it stays above 1 nat (random digits cannot be learned). The same with
``messages``. The messages run's export carries its chat template, transformers renders the same ids the trainer
trained on, and ``framework.serve`` answers a new conversation with what the model learned.
"""

from __future__ import annotations

import json
import random

import pytest

from tests.e2e.serve_support import ServerProcess, post
from tests.helpers import assert_ok, read_metrics, run_module

pytestmark = pytest.mark.e2e

ANSWER = "fixed answer"
TRAIN = ["model=debug", "data=files", "data.vocab_size=300", "trainer.seq_len=96", "trainer.global_batch_size=16",
         "trainer.micro_batch_size=8", "trainer.max_steps=120", "trainer.lr=3e-3", "trainer.warmup_steps=10",
         "trainer.log_every=20", "trainer.eval_every=120", "trainer.eval_generate=true", "logger.progress=false",
         "checkpoint.resume=none"]


def _prompt(rng: random.Random) -> str:
    return "digits: " + " ".join(str(rng.randrange(10)) for _ in range(24)) + " ="


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft-data")
    rng = random.Random(0)
    with open(d / "pc.jsonl", "w") as pc, open(d / "chat.jsonl", "w") as chat:
        for _ in range(2000):
            p = _prompt(rng)
            pc.write(json.dumps({"prompt": p, "completion": " " + ANSWER}) + "\n")
            chat.write(json.dumps({"messages": [{"role": "system", "content": "answer"}, {"role": "user", "content": p},
                                                {"role": "assistant", "content": ANSWER}]}) + "\n")
    return d


def _train(run_dir, *args) -> dict:
    proc = run_module("framework.train", [*TRAIN, f"run_dir={run_dir}", *args], timeout=600)
    assert_ok(proc)
    return read_metrics(str(run_dir))


@pytest.mark.parametrize("fmt,path", [("prompt_completion", "pc.jsonl"), ("messages", "chat.jsonl")])
def test_loss_on_the_answer_only(data, tmp_path, fmt, path):
    masked = _train(tmp_path / "masked", f"data.paths=[{data / path}]", f"data.format={fmt}")
    final = [m for m in masked if "loss" in m][-1]
    assert final["loss"] < 0.05, final
    assert final["token_accuracy"] > 0.99 and final["tokens_counted"] > 0
    ev = [m for m in masked if "eval_loss" in m][-1]
    assert ev["eval_exact_match"] == 1.0 and ev["eval_token_accuracy"] > 0.99
    whole = _train(tmp_path / "whole", f"data.paths=[{data / path}]", f"data.format={fmt}", "data.train_on_prompt=true")
    assert [m for m in whole if "loss" in m][-1]["loss"] > 1.0  # random digits: nothing to learn


def test_chat_template_reaches_transformers_and_the_server(data, tmp_path):
    import transformers

    from framework.data.prepare import held_out
    from framework.data.store import TokenStore

    run = tmp_path / "chat"
    _train(run, f"data.paths=[{data / 'chat.jsonl'}]", "data.format=auto", "trainer.eval_every=0")
    export = run / "export"
    assert (export / "chat_template.jinja").is_file()
    tok = transformers.AutoTokenizer.from_pretrained(str(export))
    rows = [json.loads(x) for x in open(data / "chat.jsonl")]
    first = next(i for i in range(len(rows)) if not held_out(i, 0.02, 0))  # the store's first training example
    store = TokenStore(str(run / "data"))
    lo, hi = store.train.offsets[0], store.train.offsets[1]
    assert tok.apply_chat_template(rows[first]["messages"], tokenize=True)["input_ids"] == store.train.tokens[lo:hi].tolist()

    server = ServerProcess(str(export), str(tmp_path / "serve.log"), pp=1)
    try:
        server.wait_ready()
        msgs = [{"role": "system", "content": "answer"}, {"role": "user", "content": _prompt(random.Random(99))}]
        status, body, _ = post(server.url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 8})
        assert status == 200, body
        assert body["choices"][0]["message"]["content"].strip() == ANSWER
        assert body["choices"][0]["finish_reason"] == "stop"  # the turn's EOS ends it
    finally:
        server.stop()
