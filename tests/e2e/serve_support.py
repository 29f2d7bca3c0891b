"""Starting and stopping a real ``framework.serve`` for the server tests (one per test module)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

from tests.helpers import PYTHON, REPO, TORCHRUN, env


class ServerProcess:
    """``torchrun -m framework.serve`` (pp > 1) or ``python -m framework.serve``, on a free port of 127.0.0.1.
    Its output goes to a log file; ``url`` and ``rank0_pid`` come from the line it prints when ready."""

    def __init__(self, model_dir: str, log_path: str, pp: int = 2, extra: list[str] | None = None,
                 launcher: bool = False):
        """``launcher``: start it the way users do, with ``launch/torchrun.sh serve`` (NPROC=pp)."""
        args = [f"model_dir={model_dir}", "serve.port=0", f"infer.pp={pp}", *(extra or [])]
        run_env = env()
        if launcher:
            cmd = ["bash", os.path.join(REPO, "launch", "torchrun.sh"), "serve", *args]
            run_env["NPROC"] = str(pp)
        elif pp == 1:
            cmd = [PYTHON, "-m", "framework.serve", *args]
        else:
            cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={pp}", "-m", "framework.serve", *args]
        self.log_path = log_path
        self.log = open(log_path, "w")
        # a session of its own: teardown can stop every rank and torchrun at once
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=run_env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.url = None
        self.rank0_pid = None

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self, timeout: float = 180) -> ServerProcess:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(r"serving \S+ on (http://[\d.]+:\d+) \(pid (\d+)", self.output())
            if m:
                self.url, self.rank0_pid = m.group(1), int(m.group(2))
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"the server did not start within {timeout}s:\n{self.output()[-4000:]}")

    def descendants(self) -> dict[int, tuple[int, str]]:
        """Every process below the launcher: pid -> (parent pid, command line)."""
        out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
        table = {}
        for line in out.splitlines():
            pid, ppid, args = (line.split(None, 2) + [""])[:3]
            table[int(pid)] = (int(ppid), args)
        below, frontier = {}, {self.proc.pid}
        while frontier:
            frontier = {p for p, (pp, _) in table.items() if pp in frontier and p not in below}
            below.update({p: table[p] for p in frontier})
        return below

    def ranks(self) -> list[int]:
        """Process ids of the ranks (the processes of framework.serve with no such child), rank 0 first."""
        if self.proc.args[0] == PYTHON:
            return [self.proc.pid]
        serving = {p: pp for p, (pp, args) in self.descendants().items() if "framework.serve" in args}
        pids = [p for p in serving if p not in serving.values()]
        return sorted(pids, key=lambda p: (p != self.rank0_pid, p))

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Kill every rank and the launcher (torchrun starts each rank in a session of its own, so killing
        torchrun's group alone would leave the ranks running)."""
        if self.proc.poll() is None:
            for pid in self.ranks() + list(self.descendants()) + [-self.proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(timeout=30)
        self.log.close()


def get(url: str, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        body, status = e.read().decode(), e.code
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


def post(url: str, body, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, dict]:
    """(status, JSON body, headers); ``body`` bytes are sent as they are (malformed JSON)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def metric(text: str, name: str, labels: str = "") -> float:
    """A sample's value from Prometheus text (0 when absent)."""
    m = re.search(rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} ([\d.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0
