"""No request can take the server down: 2,000+ random and mutated bodies against a pp=2 server started the way
users start it (``launch/torchrun.sh serve``), then SIGTERM to the launcher's process group with streams open.

The fuzz bodies are valid requests with one thing broken (wrong types, huge and negative numbers, NaN and
Infinity, unknown fields, lone surrogates, token ids out of range), random JSON values, byte-level damage
(broken UTF-8, truncation), deep nesting and bodies past ``serve.max_body_mb``. Every answer must be a 2xx or a
4xx in OpenAI's error shape, never a 5xx; the server stays healthy, logs no error, and the valid requests sent
among them get exactly what offline ``framework.generate`` gives (text, finish reason, and usage that counts
the token ids a stop string kept).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time

import pytest

from tests.e2e.serve_support import ServerProcess, get, metric
from tests.helpers import assert_ok, make_hf_model, run_module

pytestmark = pytest.mark.e2e

N_FUZZ = 2000
MAX_BODY = 64 * 1024  # serve.max_body_mb=0.0625
FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
          "stream_options", "stop", "seed", "top_k", "repetition_penalty", "ignore_eos", "user", "model",
          "logprobs", "echo", "best_of", "presence_penalty", "bogus", "\ud800", ""]
VALUES = [None, True, False, 0, 1, -1, 2, 3, 2**31, 2**63, 18446744073709551617, -(2**70), 10**400, 0.5, -0.5,
          1e-320, 1e308, -1e308, float("nan"), float("inf"), float("-inf"), "", "x", "9", "NaN", "\ud800", "é🙂",
          "a" * 300, [], [1], [-1], [10**6], [2**64], [[1, 2]], [[]], ["a", 1], [None], [{"a": 1}], [" ", "0"],
          {}, {"include_usage": True}, {"type": "text"}, {"a": [1]}, [{"role": "user", "content": "hi"}],
          [{"role": "robot", "content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fuzz") / "tiny")
    make_hf_model(path, n_layers=4)
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("fuzz-log") / "server.log")
    s = ServerProcess(model_dir, log, pp=2, launcher=True,
                      extra=["infer.max_batch=8", "serve.max_queue=2048", f"serve.max_body_mb={MAX_BODY / 2**20}",
                             "serve.default_max_tokens=4", "serve.max_n=3"])
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def references() -> list[dict]:
    """Valid requests with known answers: greedy, seeded sampling, stop strings."""
    rng = random.Random(1)
    out = []
    for i in range(24):
        prompt = "reverse: " + " ".join(str(rng.randrange(10)) for _ in range(rng.randrange(1, 7))) + " ="
        r = {"prompt": prompt, "max_new_tokens": rng.randrange(1, 12), "temperature": 0.0 if i % 3 else 0.9,
             "seed": 1000 + i}
        if i % 4 == 1:
            r["stop"] = [" ", "0"]
        out.append(r)
    return out


def mutate(rng: random.Random, vocab: int) -> tuple[str, bytes]:
    """(path, body): a valid request with one thing broken, or a broken body."""
    chat = rng.random() < 0.3
    body = {"model": "tiny", "max_tokens": rng.randrange(1, 4), "stream": rng.random() < 0.3}
    if chat:
        body["messages"] = [{"role": "user", "content": "reverse: 1 2 ="}]
    else:
        body["prompt"] = rng.choice(["reverse: 3 =", ["a b", "c"], [5, 6, 7], [[1, 2], [3]]])
    kind = rng.randrange(7)
    if kind <= 1:
        body[rng.choice(FIELDS)] = rng.choice(VALUES)
    elif kind == 2:
        body.pop(rng.choice(list(body)), None)
    elif kind == 3:
        body = rng.choice(VALUES)
    elif kind == 4 and not chat:
        body["prompt"] = rng.choice([[vocab], [-1], [0, 2**63], [[1], [vocab + 7]], [1] * 300, [[5]] * 40])
    elif kind == 4:
        body["messages"] = [{"role": "user", "content": rng.choice(VALUES)}]
    raw = json.dumps(body).encode()  # NaN and Infinity come out as JSON's non-standard literals
    if kind == 5:  # byte-level damage
        i = rng.randrange(len(raw) + 1)
        raw = raw[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4))) + raw[i + rng.randrange(3):]
    elif kind == 6:
        raw = raw[: rng.randrange(len(raw) + 1)] + rng.choice([b"", b"\xff", b"\xc3", b"\xf0\x9f"])
    return ("/v1/chat/completions" if chat else "/v1/completions"), raw


def special_cases() -> list[tuple[str, bytes]]:
    deep = [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
            b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"]
    big = [json.dumps({"prompt": "x" * (MAX_BODY + 10)}).encode(), b" " * (MAX_BODY * 3) + b"{}",
           json.dumps({"prompt": "1 " * (MAX_BODY // 4)}).encode()]  # under the cap, over the prompt's
    odd = [b"", b"null", b"\xff\xfe\x00", b'{"prompt": "\xed\xa0\x80"}', b'{"prompt": "\\ud800x"}',
           b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}',
           b'{"prompt": "x", "top_k": 18446744073709551617}', b'{"prompt": "x", "n": 1' + b"0" * 5000 + b"}"]
    return [("/v1/completions", b) for b in deep + big + odd] + [("/v1/chat/completions", b) for b in deep + odd]


async def send(c, url: str, path: str, raw: bytes, chunked: bool = False) -> dict:
    import httpx

    headers = {"Content-Type": "application/json"}
    content = raw
    if chunked:  # no Content-Length: the server must count as it reads
        async def pieces():
            for i in range(0, len(raw), 8192):
                yield raw[i: i + 8192]
        content = pieces()
    try:
        async with c.stream("POST", url + path, content=content, headers=headers) as r:
            text = (await r.aread()).decode()
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
        # a body refused while it is still being sent: the server answered 413 and closed the connection
        return {"status": None, "error": repr(exc), "size": len(raw)}
    return {"status": r.status_code, "text": text, "stream": r.headers.get("content-type", "").startswith(
        "text/event-stream"), "size": len(raw)}


def check(answer: dict) -> None:
    """A 2xx complete answer, or a 4xx in OpenAI's error shape; never a 5xx."""
    status = answer["status"]
    if status is None:
        assert answer["size"] > MAX_BODY, answer
        return
    assert status < 500, answer
    if status >= 400:
        err = json.loads(answer["text"])["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == status, answer
        assert err["message"] and "\n" not in err["message"], answer
        if answer["size"] > MAX_BODY:
            assert status == 413, answer
    elif answer["stream"]:
        assert answer["text"].rstrip().endswith("data: [DONE]"), answer
    else:
        body = json.loads(answer["text"])
        assert body["choices"] and body["usage"]["completion_tokens"] >= 0, answer


async def fuzz(url: str, vocab: int) -> tuple[list[dict], list[dict]]:
    import httpx

    rng = random.Random(0)
    cases = [mutate(rng, vocab) for _ in range(N_FUZZ)] + special_cases()
    refs = references()
    sem = asyncio.Semaphore(32)

    async def fuzz_one(c, path, raw, chunked):
        async with sem:
            return await send(c, url, path, raw, chunked)

    async def ref_one(c, r, delay):
        await asyncio.sleep(delay)  # spread among the fuzz requests
        body = {"model": "tiny", "prompt": r["prompt"], "max_tokens": r["max_new_tokens"],
                "temperature": r["temperature"], "seed": r["seed"], "stop": r.get("stop")}
        resp = await c.post(url + "/v1/completions", json=body)
        return resp.json()

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=40)) as c:
        jobs = [fuzz_one(c, p, raw, len(raw) > MAX_BODY and i % 2 == 0) for i, (p, raw) in enumerate(cases)]
        jobs += [ref_one(c, r, 0.2 * i) for i, r in enumerate(refs)]
        answers = await asyncio.gather(*jobs)
    return answers[: len(cases)], answers[len(cases):]


def test_two_thousand_malformed_requests_and_the_valid_ones_among_them(server, model_dir, tmp_path):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    t0 = time.monotonic()
    answers, ref_answers = asyncio.run(fuzz(server.url, vocab))
    wall = time.monotonic() - t0
    for a in answers:
        check(a)
    statuses = [a["status"] for a in answers]
    assert len(answers) >= N_FUZZ and statuses.count(200) >= 50 and statuses.count(400) >= 1000, statuses
    assert statuses.count(413) >= 2 and wall < 90

    refs = references()
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in refs))
    assert_ok(run_module("framework.generate", [f"model_dir={model_dir}", f"prompts={src}", f"output={out}",
                                                "infer.progress=false"]))
    offline = [json.loads(line) for line in out.read_text().splitlines()]
    got = [(a["choices"][0]["text"], a["choices"][0]["finish_reason"], a["usage"]["completion_tokens"])
           for a in ref_answers]
    assert got == [(o["text"], o["finish_reason"], len(o["token_ids"])) for o in offline]

    assert get(server.url + "/health")[0] == 200
    _, text = get(server.url + "/metrics")
    assert "status=\"5" not in text and metric(text, "miaotui_http_requests_total",
                                               'path="/v1/completions",status="400"') > 500
    log = server.output()
    assert "Traceback" not in log and not [x for x in log.splitlines() if x.startswith("error")], log[-3000:]


async def _streams(url: str, n: int, started: asyncio.Event) -> list[dict]:
    import httpx

    async def one(c):
        body = {"model": "tiny", "prompt": "reverse: 4 2 =", "max_tokens": 60, "ignore_eos": True, "stream": True}
        finish, done, tokens = None, False, 0
        async with c.stream("POST", url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    tokens += 1
                    if tokens == 2:
                        started.set()
                    finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
        return {"status": r.status_code, "finish": finish, "done": done}

    async with httpx.AsyncClient(timeout=120) as c:
        return await asyncio.gather(*[one(c) for _ in range(n)])


def test_sigterm_to_the_launchers_process_group_drains_and_exits_0(server):
    """Last: it stops the module's server. The signal reaches the launcher script, torchrun and tee (the ranks
    run in sessions of their own): every open stream completes and the launcher exits 0."""
    ranks = server.ranks()
    assert len(ranks) == 2

    async def scenario():
        started = asyncio.Event()
        task = asyncio.ensure_future(_streams(server.url, 6, started))
        await asyncio.wait_for(started.wait(), 60)
        os.killpg(server.proc.pid, signal.SIGTERM)
        return await task

    answers = asyncio.run(scenario())
    assert answers == [{"status": 200, "finish": "length", "done": True}] * 6
    assert server.wait_exit(timeout=60) == 0, server.output()[-3000:]
    assert "stopped after" in server.output()
    for pid in ranks:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
