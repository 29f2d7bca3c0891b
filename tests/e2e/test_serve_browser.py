"""The playground page in a real headless Chromium, then kill -9 of the last pipeline stage.

One ``torchrun -m framework.serve`` at pp=2 for the module (no API key). The browser test types a prompt, clicks
Generate and waits for streamed text and the tokens/s figure; its screenshot is kept in tests/e2e/artifacts/.
The last test kills the last stage mid-request: open requests get 503, and the job exits non-zero within seconds.
Chromium comes from Debian (``chromium``, ``chromium-driver``; scripts/setup.sh installs them as root); without
it the browser test is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time

import pytest

from tests.e2e.serve_support import ServerProcess, get, post
from tests.helpers import REPO, make_hf_model

pytestmark = pytest.mark.e2e

ARTIFACTS = os.path.join(REPO, "tests", "e2e", "artifacts")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-browser")
    make_hf_model(str(root / "tiny"), n_layers=4)
    s = ServerProcess(str(root / "tiny"), str(root / "server.log"), pp=2, extra=["infer.max_batch=8"])
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="no chromium + chromedriver (Debian: apt-get install chromium "
                                                 "chromium-driver; scripts/setup.sh does it as root)")
def test_playground_streams_in_headless_chromium(server):
    pytest.importorskip("selenium", reason="selenium is in the dev extra")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    profile = tempfile.mkdtemp(prefix="miaotui-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.set_page_load_timeout(30)
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")  # the page read /health
        box = driver.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys("reverse: 1 2 3 =")
        tokens = driver.find_element(By.ID, "max_tokens")
        tokens.clear()
        tokens.send_keys("48")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "4", "5")))
        status = driver.find_element(By.ID, "status").text
        output = driver.execute_script("return document.getElementById('output').textContent")  # raw, unrendered
        stats = driver.find_element(By.ID, "stats").text
        os.makedirs(ARTIFACTS, exist_ok=True)
        driver.save_screenshot(os.path.join(ARTIFACTS, "playground.png"))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    assert status in ("done (length)", "done (stop)"), status
    assert output.startswith("reverse: 1 2 3 =") and len(output) > len("reverse: 1 2 3 =")
    # the same text the API gives for the same greedy request
    _, answer, _ = post(server.url + "/v1/completions", {"prompt": "reverse: 1 2 3 =", "max_tokens": 48,
                                                         "temperature": 0})
    assert output == "reverse: 1 2 3 =" + answer["choices"][0]["text"]
    n = int(stats.split()[1])
    assert n == answer["usage"]["completion_tokens"] and "tokens/s" in stats and "–" not in stats.split("·")[1]


def test_kill_9_of_the_last_stage_gives_503_and_a_non_zero_exit(server):
    """Last: it ends the module's server."""
    assert get(server.url + "/health")[0] == 200
    results = []
    streaming = threading.Event()  # the kill lands while the requests run: after a streamed token has come

    def ask(stream: bool):
        body = {"prompt": "reverse: 9 =", "max_tokens": 250, "ignore_eos": True, "stream": stream}
        if not stream:
            results.append(post(server.url + "/v1/completions", body, timeout=60)[:2])
            return
        import urllib.request

        req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        events = []
        with urllib.request.urlopen(req, timeout=60) as r:
            for raw in r:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    events.append(line)
                    streaming.set()
        results.append((r.status, json.loads(events[-1][6:])))

    askers = [threading.Thread(target=ask, args=(i % 2 == 1,)) for i in range(4)]
    for t in askers:
        t.start()
    assert streaming.wait(timeout=30)
    ranks = server.ranks()
    assert len(ranks) == 2
    t0 = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    code = server.wait_exit(timeout=30)
    took = time.monotonic() - t0
    for t in askers:
        t.join(timeout=30)
    assert code != 0 and took < 15, (code, took)
    assert len(results) == 4
    for status, body in results:  # non-streamed: a 503; streamed: the stream ends with the error
        assert body["error"]["code"] == 503 and "server is down" in body["error"]["message"], body
        assert status in (200, 503)
    assert "error: rank 0: a pipeline stage failed" in server.output()
    assert not [pid for pid in ranks if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\tZ" not in f.read().split("State:")[1].split("\n")[0]  # a zombie has exited
    except (FileNotFoundError, IndexError):
        return False
