"""The OpenAI-compatible server, for real: one ``torchrun -m framework.serve`` at pp=2 for the module.

The real ``openai`` client (completions and chat, streamed and not); 200 requests from 32 concurrent clients,
every answer complete and its greedy text equal to ``framework.generate`` run offline at pp=1; n, seed and
stop strings; bad input (4xx with a message, and the server keeps serving); a client that goes away frees its
slot (the metrics show it); a full queue answers 429; SIGTERM to rank 0 mid-load finishes the open requests and
the job exits 0. Bad keys at start are one line.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import time

import pytest

from tests.e2e.serve_support import ServerProcess, get, metric, post
from tests.helpers import assert_ok, error_lines, make_hf_model, run_module

pytestmark = pytest.mark.e2e

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SLOTS, QUEUE = 8, 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("serve") / "tiny")
    make_hf_model(path, n_layers=4)
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("serve-log") / "server.log")
    s = ServerProcess(model_dir, log, pp=2, extra=[f"serve.api_key={KEY}", f"infer.max_batch={SLOTS}",
                                                   f"serve.max_queue={QUEUE}"])
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_client_completions_and_chat(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    prompt = "reverse: 4 1 7 ="
    full = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length") and full.usage.completion_tokens >= 1
    assert full.usage.prompt_tokens == 6 and full.usage.total_tokens == 6 + full.usage.completion_tokens
    parts, finish = [], None
    for ev in c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True):
        parts.append(ev.choices[0].text)
        finish = ev.choices[0].finish_reason or finish
    assert "".join(parts) == choice.text and finish == choice.finish_reason

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse: 1 2 ="}]
    chat = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.prompt_tokens > 10  # the default template's role markers
    parts, usage = [], None
    stream = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    for ev in stream:
        if ev.usage:
            usage = ev.usage
        for ch in ev.choices:
            parts.append(ch.delta.content or "")
    assert "".join(parts) == chat.choices[0].message.content
    assert usage.completion_tokens == chat.usage.completion_tokens


def _prompts(n: int) -> list[dict]:
    rng = random.Random(0)
    return [{"prompt": "reverse: " + " ".join(str(rng.randrange(10)) for _ in range(rng.randrange(1, 9))) + " =",
             "max_new_tokens": rng.randrange(1, 33)} for _ in range(n)]


async def _load(url: str, prompts: list[dict], concurrency: int) -> list[dict]:
    import httpx

    sem = asyncio.Semaphore(concurrency)

    async def one(c, i, p):
        body = {"model": "tiny", "prompt": p["prompt"], "max_tokens": p["max_new_tokens"], "temperature": 0,
                "stream": i % 2 == 1}
        async with sem:
            if not body["stream"]:
                r = await c.post(url + "/v1/completions", json=body, headers=AUTH)
                ch = r.json()["choices"][0] if r.status_code == 200 else {}
                return {"status": r.status_code, "text": ch.get("text"), "finish": ch.get("finish_reason")}
            text, finish, done = "", None, False
            async with c.stream("POST", url + "/v1/completions", json=body, headers=AUTH) as r:
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        ch = json.loads(line[6:])["choices"][0]
                        text += ch["text"]
                        finish = ch["finish_reason"] or finish
            return {"status": r.status_code, "text": text, "finish": finish if done else None}

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as c:
        return await asyncio.gather(*[one(c, i, p) for i, p in enumerate(prompts)])


def test_load_200_requests_32_clients_equal_offline_generate(server, model_dir, tmp_path):
    prompts = _prompts(200)
    t0 = time.monotonic()
    answers = asyncio.run(_load(server.url, prompts, 32))
    wall = time.monotonic() - t0
    assert all(a["status"] == 200 for a in answers), [a["status"] for a in answers]
    assert all(a["finish"] in ("stop", "length") for a in answers)  # every one complete ([DONE] for streams)
    assert wall < 120

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    assert_ok(run_module("framework.generate", [f"model_dir={model_dir}", f"prompts={src}", f"output={out}",
                                                "infer.progress=false"]))
    offline = [json.loads(line) for line in out.read_text().splitlines()]
    assert [o["text"] for o in offline] == [a["text"] for a in answers]
    assert [o["finish_reason"] for o in offline] == [a["finish"] for a in answers]
    status, text = get(server.url + "/metrics")
    assert status == 200 and "status=\"5" not in text
    assert metric(text, "miaotui_requests_finished_total", 'finish_reason="length"') + metric(
        text, "miaotui_requests_finished_total", 'finish_reason="stop"') >= 200


def test_n_seed_and_stop(server):
    url = server.url + "/v1/completions"
    body = {"model": "tiny", "prompt": "reverse: 3 5 =", "max_tokens": 16, "temperature": 1.0, "seed": 7, "n": 3}
    s1, a, _ = post(url, body, AUTH)
    s2, b, _ = post(url, body, AUTH)
    assert s1 == s2 == 200 and [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # seeded: reproducible
    assert len({c["text"] for c in a["choices"]}) > 1  # and each choice its own draw

    greedy = {"model": "tiny", "prompt": "reverse: 8 8 1 =", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    _, full, _ = post(url, greedy, AUTH)
    text = full["choices"][0]["text"]
    stop = text[5:8]
    cut = text[: text.index(stop)]
    _, stopped, _ = post(url, {**greedy, "stop": [stop, "never-there"]}, AUTH)
    assert stopped["choices"][0] == {**stopped["choices"][0], "text": cut, "finish_reason": "stop"}
    from openai import OpenAI

    c = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    streamed = "".join(ev.choices[0].text for ev in c.completions.create(
        model="tiny", prompt=greedy["prompt"], max_tokens=24, temperature=0, stop=[stop], stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == cut


@pytest.mark.parametrize("body,headers,status,words", [
    (b'{"model": "tiny", "prompt": "x"', AUTH, 400, "malformed JSON"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "9"}, AUTH, 400, "'max_tokens' must be an integer"),
    ({"model": "tiny", "prompt": 5}, AUTH, 400, "'prompt' must be"),
    ({"model": "tiny", "prompt": "x", "temperature": True}, AUTH, 400, "'temperature' must be a number"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -3}, AUTH, 400, "'max_tokens'=-3"),
    ({"model": "tiny", "prompt": "1 " * 300}, AUTH, 400, "context holds 256"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 256}, AUTH, 400, "lower max_tokens"),
    ({"model": "gpt-4", "prompt": "x"}, AUTH, 404, "model 'gpt-4' is not served here"),
    ({"model": "tiny", "prompt": "x"}, {"Authorization": "Bearer wrong"}, 401, "API key"),
    ({"model": "tiny", "prompt": "x"}, {}, 401, "API key"),
    ({"model": "tiny", "prompt": "x", "suffix": "y"}, AUTH, 400, "'suffix' is not supported"),
    ({"model": "tiny", "prompt": "x", "frobnicate": 1}, AUTH, 400, "unknown field 'frobnicate'"),
    ({"model": "tiny", "prompt": "x", "n": 99}, AUTH, 400, "'n'=99"),
    ({"model": "tiny", "prompt": [1, 2, 99999]}, AUTH, 400, "outside the vocabulary"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}]}, AUTH, 400, "unknown field 'messages'"),
])
def test_bad_input_is_a_4xx_with_a_message(server, body, headers, status, words):
    got, answer, _ = post(server.url + "/v1/completions", body, headers)
    assert got == status and words in answer["error"]["message"], answer
    ok, good, _ = post(server.url + "/v1/completions", {"model": "tiny", "prompt": "reverse: 1 =", "max_tokens": 2},
                       AUTH)
    assert ok == 200 and good["choices"][0]["finish_reason"] in ("stop", "length")


def test_bad_chat_input(server):
    url = server.url + "/v1/chat/completions"
    for body, words in [({"model": "tiny", "messages": []}, "'messages' must be a non-empty array"),
                        ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "'messages[0].role'"),
                        ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                         "only text parts"),
                        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"a": 1}]},
                         "'tools' is not supported")]:
        status, answer, _ = post(url, body, AUTH)
        assert status == 400 and words in answer["error"]["message"], answer
    assert get(server.url + "/health")[0] == 200


def _engine_gauges(server) -> dict:
    _, text = get(server.url + "/metrics")
    return {"running": metric(text, "miaotui_requests_running"), "used": metric(text, "miaotui_kv_slots_used"),
            "abort": metric(text, "miaotui_requests_finished_total", 'finish_reason="abort"')}


def _wait_for(cond, timeout: float = 20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_a_client_that_goes_away_frees_its_slot(server):
    import httpx

    before = _engine_gauges(server)["abort"]
    body = {"model": "tiny", "prompt": "reverse: 2 =", "max_tokens": 250, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few tokens have streamed
        assert got[0].startswith("data: ")
        busy = _engine_gauges(server)
        assert busy["running"] >= 1 and busy["used"] >= 1
    # the stream is closed: the engine aborts the row and frees its slot
    _wait_for(lambda: _engine_gauges(server) == {"running": 0, "used": 0, "abort": before + 1})
    # a non-streamed request whose client gives up: sent in full, then no more than 50 ms of waiting for the answer
    # (250 tokens take several times that)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, headers=AUTH,
                   timeout=httpx.Timeout(10, read=0.05))
    _wait_for(lambda: _engine_gauges(server) == {"running": 0, "used": 0, "abort": before + 2})


def test_a_full_queue_answers_429(server):
    import httpx

    body = {"model": "tiny", "prompt": "reverse: 5 =", "max_tokens": 250, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=64)) as c:
        streams = []
        try:
            for _ in range(SLOTS + QUEUE):
                cm = c.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH)
                streams.append(cm)
                assert cm.__enter__().status_code == 200
            r = c.post(server.url + "/v1/completions", json=body, headers=AUTH)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert "queue is full" in r.json()["error"]["message"]
        finally:
            for cm in streams:
                cm.__exit__(None, None, None)
    _wait_for(lambda: _engine_gauges(server)["used"] == 0 and _engine_gauges(server)["running"] == 0)
    status, answer, _ = post(server.url + "/v1/completions", {"model": "tiny", "prompt": "reverse: 1 =",
                                                              "max_tokens": 3}, AUTH)
    assert status == 200


def test_bad_keys_at_start_are_one_line(model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = run_module("framework.serve", [f"model_dir={model_dir}", f"serve.port={port}"], timeout=120)
    assert proc.returncode != 0 and error_lines(proc) and "cannot listen" in error_lines(proc)[0]
    proc = run_module("framework.serve", [f"model_dir={model_dir}", "serve.port=70000", "serve.chat_template=x"])
    assert proc.returncode != 0 and error_lines(proc) == ["error: serve.port=70000: use a port in 1-65535, or 0 "
                                                          "for a free one"]


def test_sigterm_mid_load_finishes_open_requests_and_exits_0(server):
    """Last: it stops the module's server."""
    import threading

    prompts = _prompts(24)
    for p in prompts:
        p["max_new_tokens"] = 40
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("answers", asyncio.run(
        _load_ignore_eos(server.url, prompts))))
    worker.start()
    _wait_for(lambda: _engine_gauges(server)["running"] >= SLOTS // 2)
    os.kill(server.rank0_pid, signal.SIGTERM)
    worker.join(timeout=120)
    answers = result["answers"]
    assert [a["status"] for a in answers] == [200] * len(answers)
    assert all(a["finish"] == "length" for a in answers)
    assert server.wait_exit(timeout=60) == 0
    assert "stopped after" in server.output()


async def _load_ignore_eos(url: str, prompts: list[dict]) -> list[dict]:
    import httpx

    async def one(c, i, p):
        body = {"model": "tiny", "prompt": p["prompt"], "max_tokens": p["max_new_tokens"], "ignore_eos": True,
                "stream": i % 2 == 0}
        if not body["stream"]:
            r = await c.post(url + "/v1/completions", json=body, headers=AUTH)
            return {"status": r.status_code, "finish": r.json()["choices"][0]["finish_reason"]}
        finish, done = None, False
        async with c.stream("POST", url + "/v1/completions", json=body, headers=AUTH) as r:
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
        return {"status": r.status_code, "finish": finish if done else None}

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=len(prompts))) as c:
        return await asyncio.gather(*[one(c, i, p) for i, p in enumerate(prompts)])
