"""Log-probabilities and lm-evaluation-harness, three ways, against references nobody here wrote.

One random tiny Llama saved by transformers, a pp=2 ``framework.serve`` for the module:
- ``echo`` + ``logprobs`` on /v1/completions (streamed and not) and chat ``logprobs``/``top_logprobs``: every
  prompt and generated token's log-probability and its alternatives equal transformers' forward pass;
- the same tasks (sentiment: multiple choice; translation: greedy generation with BLEU/chrF) evaluated by
  lm-eval's own ``hf`` model on the export, by lm-eval's ``local-completions`` against the server, and by
  ``framework.eval tasks=[...]`` at pp=2: the same per-request log-likelihoods (1e-4 relative), the same greedy
  generations, the same scores.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from tests.e2e.serve_support import ServerProcess, post
from tests.helpers import assert_ok, make_hf_model, run_module

pytestmark = pytest.mark.e2e

TASKS = ["miaotui_sentiment", "miaotui_translate"]
LIMIT = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from framework.data.tasks import TASK_NAMES, make_task_rows

    texts = [r["prompt"] + r["completion"] for t in TASK_NAMES for r in make_task_rows(t, 300, 7)]
    path = str(tmp_path_factory.mktemp("evalm") / "tiny")
    make_hf_model(path, n_layers=2, vocab_texts=texts, init_std=0.05)
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("eval-log") / "server.log")
    s = ServerProcess(model_dir, log, pp=2, extra=["infer.max_batch=8"])
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def hf(model_dir):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    return model, tok


def _reference(hf, ids: list[int], new: int, k: int):
    """transformers: greedy continuation of ``ids`` and the log-softmax rows of the prompt and of the new tokens."""
    import torch

    model, _ = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=0)
        full = out[0].tolist()
        lp = torch.log_softmax(model(out).logits[0].float(), -1)  # (T, V): row t predicts token t + 1
    return full[len(ids):], lp


def test_completions_echo_logprobs_equal_transformers(server, hf):
    _, tok = hf
    ids = tok("Review: the soup was cold.\nSentiment:", add_special_tokens=False)["input_ids"]
    body = {"prompt": ids, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 3, "ignore_eos": True}
    status, r, _ = post(server.url + "/v1/completions", body)
    assert status == 200, r
    choice = r["choices"][0]
    new, lp = _reference(hf, ids, 4, 3)
    lps = choice["logprobs"]
    assert len(lps["tokens"]) == len(ids) + 4 and lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
    assert choice["text"] == tok.decode(ids) + tok.decode(new)
    for t, (token, got) in enumerate(zip(ids[1:] + new, lps["token_logprobs"][1:])):
        assert math.isclose(got, lp[t, token].item(), rel_tol=1e-4, abs_tol=1e-5), (t, got)
        want = {tok.decode([i]): v for v, i in zip(*[x.tolist() for x in lp[t].topk(3)])}
        assert set(lps["top_logprobs"][t + 1]) == set(want)
    assert lps["text_offset"][0] == 0 and lps["text_offset"][len(ids)] == len(tok.decode(ids))
    # streamed: the same tokens and numbers, the prompt in the first chunk
    events = _stream(server.url + "/v1/completions", {**body, "stream": True})
    streamed = {"tokens": [], "token_logprobs": []}
    for ev in events:
        part = ev["choices"][0]["logprobs"] if ev["choices"] else None
        if part:
            streamed["tokens"] += part["tokens"]
            streamed["token_logprobs"] += part["token_logprobs"]
    assert streamed["tokens"] == lps["tokens"]
    assert all(a == b or math.isclose(a, b, rel_tol=1e-6) for a, b in
               zip(streamed["token_logprobs"][1:], lps["token_logprobs"][1:]))


def test_chat_logprobs(server, hf):
    _, tok = hf
    body = {"messages": [{"role": "user", "content": "Digits: 4 0 7\nWords:"}], "max_tokens": 3, "temperature": 0,
            "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    status, r, _ = post(server.url + "/v1/chat/completions", body)
    assert status == 200, r
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(c["top_logprobs"]) == 2 for c in content)
    for c in content:  # greedy: each token is its own most likely alternative
        assert c["top_logprobs"][0]["logprob"] == pytest.approx(c["logprob"], abs=1e-6)
        assert bytes(c["bytes"]).decode("utf-8", "replace") == c["token"]
    status, r, _ = post(server.url + "/v1/chat/completions", {**body, "logprobs": False})
    assert status == 400 and "top_logprobs" in r["error"]["message"]


def _stream(url: str, body: dict) -> list[dict]:
    import httpx

    events = []
    with httpx.stream("POST", url, json=body, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def _samples(results: dict) -> dict:
    """task -> doc_id -> the raw responses (log-likelihoods of every choice, or the generated text)."""
    out = {}
    for task, rows in results["samples"].items():
        out[task] = {}
        for row in rows:
            resp = [r[0] for r in row["resps"]]
            out[task][row["doc_id"]] = [(float(x[0]), bool(x[1])) if isinstance(x, (list, tuple)) else x for x in resp]
    return out


def _evaluate(model: str, model_args: dict) -> dict:
    from lm_eval import simple_evaluate

    from framework.evaluation.tasks import task_manager

    # a process group set up earlier in this pytest process (world 1) leaves RANK/WORLD_SIZE/MASTER_* behind, and
    # lm-eval's hf model (accelerate) would take them for a launch: it runs here as a plain single process
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    try:
        return simple_evaluate(model=model, model_args=model_args, tasks=TASKS, limit=LIMIT, log_samples=True,
                               task_manager=task_manager(None), batch_size=4)
    finally:
        os.environ.update(saved)


def _assert_same(a: dict, b: dict, what: str) -> None:
    sa, sb = _samples(a), _samples(b)
    for task in TASKS:
        assert sa[task].keys() == sb[task].keys()
        for doc, ra in sa[task].items():
            rb = sb[task][doc]
            for x, y in zip(ra, rb):
                if isinstance(x, tuple):
                    assert math.isclose(x[0], y[0], rel_tol=1e-4, abs_tol=1e-4), (what, task, doc, x, y)
                    assert x[1] == y[1], (what, task, doc)
                else:
                    assert x == y, (what, task, doc)
    for task in TASKS:
        for metric, value in a["results"][task].items():
            if "stderr" not in metric and isinstance(value, float):
                assert value == pytest.approx(b["results"][task][metric], abs=1e-6), (what, task, metric)


def test_three_ways_agree(server, model_dir, tmp_path):
    hf_results = _evaluate("hf", {"pretrained": model_dir, "dtype": "float32", "device": "cpu"})
    served = _evaluate("local-completions", {"model": os.path.basename(model_dir), "base_url":
                                             server.url + "/v1/completions", "tokenizer_backend": "huggingface",
                                             "tokenizer": model_dir, "max_retries": 1, "num_concurrent": 4})
    _assert_same(hf_results, served, "local-completions")
    out = str(tmp_path / "results.json")
    proc = run_module("framework.eval", [f"model_dir={model_dir}", f"tasks=[{','.join(TASKS)}]", f"limit={LIMIT}",
                                         "log_samples=true", f"output={out}", "infer.pp=2"], nproc=2, timeout=600)
    assert_ok(proc)
    assert "miaotui_sentiment" in proc.stdout  # lm-eval's table
    with open(out) as f:
        ours = json.load(f)
    _assert_same(hf_results, ours, "framework.eval pp=2")


def test_unknown_task_is_one_line(model_dir):
    proc = run_module("framework.eval", [f"model_dir={model_dir}", "tasks=[no_such_task]"])
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert "unknown task 'no_such_task'" in lines[-1], proc.stderr[-2000:]
