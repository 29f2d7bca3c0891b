"""An idle multi-process server outlives its process groups' timeout.

gloo fails a receive that waits longer than its group's timeout, and every rank but rank 0 spends an idle server's
life inside a receive of its next step plan. With ``serve.group_timeout_s`` set to a few seconds, a pp=2 server
over the process groups (``infer.transport=backend``, the path CUDA takes) stays up for more than three timeouts
without a request (rank 0's keep-alive plans re-arm every receive, engine.py), then answers exactly as offline
generation does. Without the keep-alive the follower dies after one timeout (checked by hand when this was built:
"rank 1: the pipeline broke (Timed out waiting 5000ms for recv operation to complete)").
"""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.serve_support import ServerProcess, post
from tests.helpers import assert_ok, make_hf_model, run_module

pytestmark = pytest.mark.e2e

GROUP_TIMEOUT_S = 5
PROMPT = "reverse: 3 1 4 1 5 ="


def test_idle_pp2_server_outlives_group_timeout(tmp_path):
    model_dir = str(tmp_path / "tiny")
    make_hf_model(model_dir, n_layers=4)
    server = ServerProcess(model_dir, str(tmp_path / "server.log"), pp=2,
                           extra=["infer.transport=backend", f"serve.group_timeout_s={GROUP_TIMEOUT_S}",
                                  "infer.max_batch=4"])
    try:
        server.wait_ready()
        assert "ring process groups" in server.output(), server.output()[-3000:]  # not the shared-memory ring
        idle_until = time.monotonic() + 3.2 * GROUP_TIMEOUT_S
        while time.monotonic() < idle_until:  # no request at all meanwhile
            assert server.proc.poll() is None, f"the idle server died:\n{server.output()[-3000:]}"
            time.sleep(0.5)
        assert server.proc.poll() is None and "pipeline broke" not in server.output(), server.output()[-3000:]
        status, body, _ = post(server.url + "/v1/completions",
                               {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
        assert status == 200, body
    finally:
        server.stop()
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": PROMPT, "max_new_tokens": 12}) + "\n")
    assert_ok(run_module("framework.generate", [f"model_dir={model_dir}", f"prompts={src}", f"output={out}",
                                                "infer.temperature=0"]))
    offline = json.loads(out.read_text().splitlines()[0])
    assert body["choices"][0]["text"] == offline["text"]
    assert body["choices"][0]["finish_reason"] == offline["finish_reason"]
