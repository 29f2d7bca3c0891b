"""Serving benchmark: ``framework.serve`` beside ``transformers serve --continuous-batching`` on the same export,
machine and load.

Each server is started in turn (never both at once), warmed up, then fed the same requests at three Poisson
arrival rates: the same prompts (random digit strings of a spread of lengths), greedy, ``max_tokens`` each,
streamed (server-sent events), through one asyncio client. Per rate and server: time to the first token (TTFT),
time per output token after the first (TPOT), the gaps between streamed chunks (inter-token latency, ITL), each
at p50 and p99, and output tokens/s (every completion token over the span from the first arrival to the last
answer). Token counts come from the servers' ``usage``. The greedy texts of both servers are compared as a check
that they ran the same model.

    flock /tmp/miaotui-bench.lock python scripts/bench_serve.py                  # the 30M Llama of bench_infer, pp=2
    flock /tmp/miaotui-bench.lock python scripts/bench_serve.py --model runs/x/export --rates 1,4,16 --requests 64
    python scripts/bench_serve.py --no-baseline --pp 1                           # ours only
    python scripts/bench_serve.py --static       # also ours with static batching (infer.scheduler=static)

Every figure, with each request's timings, goes to ``--out`` (JSON), and the plots beside it: TTFT, TPOT and
tokens/s against the arrival rate, and per rate the CDF of request latency of every server (``framework.report``).

Both servers get the whole machine: ours as ``--pp`` processes of one thread each (one pipeline stage a core),
transformers with OMP_NUM_THREADS = the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(threads: int) -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
             PYTHONPATH=REPO + os.pathsep + e.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    return e


class Server:
    """A server process in a session of its own; ``stop`` ends it (and, for torchrun, every rank)."""

    def __init__(self, name: str, cmd: list[str], threads: int, port: int, model_id: str, log: str):
        self.name, self.port, self.model_id, self.log_path = name, port, model_id, log
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env(threads), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.name} did not start within {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        m = re.search(r"\(pid (\d+)", open(self.log_path).read())
        os.kill(int(m.group(1)) if m else self.proc.pid, signal.SIGTERM)  # ours: rank 0 drains and stops the job
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for pid in [int(p) for p in children] + [-self.proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(timeout=30)
        self.log.close()


def make_prompts(n: int, lo: int, hi: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["reverse: " + " ".join(str(rng.randrange(10)) for _ in range(rng.randint(lo, hi))) + " =" for _ in range(n)]


async def one_request(client, server: Server, prompt: str, max_tokens: int, t_send: float) -> dict:
    body = {"model": server.model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    rec = {"t_send": t_send, "t_first": None, "chunks": [], "tokens": None, "text": "", "error": None}
    try:
        async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                ev = json.loads(line[6:])
                if ev.get("usage"):
                    rec["tokens"] = ev["usage"]["completion_tokens"]
                for ch in ev.get("choices") or []:
                    if ch.get("text"):
                        rec["t_first"] = rec["t_first"] or now
                        rec["chunks"].append(now)
                        rec["text"] += ch["text"]
    except Exception as exc:  # noqa: BLE001 - a failed request is reported, not fatal
        rec["error"] = repr(exc)
    rec["t_end"] = time.perf_counter()
    if rec["tokens"] is None:
        rec["tokens"] = len(rec["chunks"])
    return rec


async def run_rate(server: Server, prompts: list[str], rate: float, max_tokens: int, seed: int) -> list[dict]:
    """Requests leave at Poisson arrival times (exponential gaps of mean 1/rate)."""
    import httpx

    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1200.0), limits=httpx.Limits(max_connections=4096)) as c:
        t0 = time.perf_counter()
        tasks, t = [], 0.0
        for p in prompts:
            delay = t0 + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(c, server, p, max_tokens, time.perf_counter())))
            t += rng.expovariate(rate)
        return await asyncio.gather(*tasks)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def summarize(recs: list[dict]) -> dict:
    ok = [r for r in recs if r["error"] is None]
    timed = [r for r in ok if r["t_first"] is not None]  # a stream may carry no text at all (undecodable bytes)
    ttft = [r["t_first"] - r["t_send"] for r in timed]
    tpot = [(r["t_end"] - r["t_first"]) / (r["tokens"] - 1) for r in timed if r["tokens"] > 1]
    itl = [b - a for r in timed for a, b in zip(r["chunks"], r["chunks"][1:])]
    span = max(r["t_end"] for r in recs) - min(r["t_send"] for r in recs)
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(recs), "errors": len(recs) - len(ok), "without_text": len(ok) - len(timed),
            "output_tokens": tokens, "span_s": span,
            "output_tokens_per_s": tokens / span if span > 0 else 0.0,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99), "tpot_p50_s": pct(tpot, 0.5),
            "tpot_p99_s": pct(tpot, 0.99), "itl_p50_s": pct(itl, 0.5), "itl_p99_s": pct(itl, 0.99)}


def request_timings(recs: list[dict]) -> list[dict]:
    """Each answered request's TTFT, TPOT and latency (send to last byte), for the latency CDFs."""
    out = []
    for r in recs:
        if r["error"] is not None or r["t_first"] is None:
            continue
        out.append({"ttft_s": r["t_first"] - r["t_send"], "latency_s": r["t_end"] - r["t_send"], "tokens": r["tokens"],
                    "tpot_s": (r["t_end"] - r["t_first"]) / (r["tokens"] - 1) if r["tokens"] > 1 else None})
    return out


def bench_server(server: Server, prompts: list[str], rates: list[float], max_tokens: int, seed: int) -> dict:
    server.wait_ready()
    # warm-up: the first requests pay one-time costs (transformers builds its batching manager, compiles, ...)
    asyncio.run(run_rate(server, prompts[:4], 100.0, max_tokens, seed))
    out = {}
    for rate in rates:
        recs = asyncio.run(run_rate(server, prompts, rate, max_tokens, seed))
        out[rate] = {"summary": summarize(recs), "texts": [r["text"] for r in recs],
                     "errors": sorted({r["error"] for r in recs if r["error"]}), "requests": request_timings(recs)}
        s = out[rate]["summary"]
        print(f"[bench_serve] {server.name} rate {rate}/s: {s['output_tokens_per_s']:.1f} tok/s, "
              f"ttft p50 {s['ttft_p50_s']} p99 {s['ttft_p99_s']}, errors {s['errors']}", file=sys.stderr, flush=True)
    return out


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="an export directory (default: bench_infer's random 30M Llama, built here)")
    ap.add_argument("--rates", default="0.5,2,8", help="Poisson arrival rates, requests/s")
    ap.add_argument("--requests", type=int, default=24, help="requests per rate")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-digits", default="4,48", help="digits per prompt: uniform in [lo, hi]")
    ap.add_argument("--pp", type=int, default=2, help="our pipeline stages (one process of one thread each)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="transformers' OMP_NUM_THREADS")
    ap.add_argument("--ours", nargs="*", default=[], help="more overrides for framework.serve (infer.max_batch=64 ...)")
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers serve")
    ap.add_argument("--static", action="store_true",
                    help="also run ours with static batching (infer.scheduler=static): the latency CDFs compare them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "bench_serve", "bench_serve.json"),
                    help="write every figure as JSON here, the plots beside it")
    args = ap.parse_args()

    rates = [float(r) for r in args.rates.split(",")]
    lo, hi = (int(x) for x in args.prompt_digits.split(","))
    prompts = make_prompts(args.requests, lo, hi, args.seed)
    work = tempfile.mkdtemp(prefix="bench-serve-")
    model = args.model
    if model is None:
        sys.path.insert(0, os.path.join(REPO, "scripts"))
        from bench_infer import make_model

        model = os.path.join(work, "m30")
        make_model(model, "30m")
    model = os.path.abspath(model)
    max_len = 64 + 2 * hi + args.max_tokens  # room for the longest prompt and the new tokens

    port = free_port()
    ours_cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.pp}", "-m",
                "framework.serve", f"model_dir={model}", f"infer.pp={args.pp}", f"serve.port={port}",
                f"infer.max_seq_len={max_len}", "serve.model_name=bench", *args.ours]
    if args.pp == 1:
        ours_cmd = [PY, "-m", "framework.serve", *ours_cmd[7:]]
    results = {}
    ours = Server("miaotui", ours_cmd, 1, port, "bench", os.path.join(work, "ours.log"))
    try:
        results["miaotui"] = bench_server(ours, prompts, rates, args.max_tokens, args.seed)
    finally:
        ours.stop()
    if args.static:
        port = free_port()
        cmd = [a for a in ours_cmd if not a.startswith("serve.port=")] + [f"serve.port={port}", "infer.scheduler=static"]
        static = Server("miaotui static", cmd, 1, port, "bench", os.path.join(work, "ours-static.log"))
        try:
            results["miaotui static"] = bench_server(static, prompts, rates, args.max_tokens, args.seed)
        finally:
            static.stop()
    if not args.no_baseline:
        port = free_port()
        hf_cmd = [os.path.join(os.path.dirname(PY), "transformers"), "serve", model, "--continuous-batching",
                  "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        hf = Server("transformers", hf_cmd, args.threads, port, model, os.path.join(work, "transformers.log"))
        try:
            results["transformers"] = bench_server(hf, prompts, rates, args.max_tokens, args.seed)
        finally:
            hf.stop()

    print(f"\n{args.requests} requests a rate, {args.max_tokens} new tokens each (greedy, streamed), prompts of "
          f"{lo}-{hi} digits; ours pp={args.pp} x 1 thread, transformers {args.threads} threads\n")
    print("| rate (req/s) | server | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | ITL p50 / p99 (ms) "
          "| errors (streams without text) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for rate in rates:
        for name, res in results.items():
            s = res[rate]["summary"]
            print(f"| {rate:g} | {name} | {s['output_tokens_per_s']:.1f} | {ms(s['ttft_p50_s'])} / "
                  f"{ms(s['ttft_p99_s'])} | {ms(s['tpot_p50_s'])} / {ms(s['tpot_p99_s'])} | {ms(s['itl_p50_s'])} / "
                  f"{ms(s['itl_p99_s'])} | {s['errors']} ({s['without_text']}) |")
    if "transformers" in results:
        print()
        for rate in rates:
            a, b = results["miaotui"][rate], results["transformers"][rate]
            sa, sb = a["summary"], b["summary"]
            same = sum(x == y for x, y in zip(a["texts"], b["texts"]))
            prefix = sum(x.startswith(y) or y.startswith(x) for x, y in zip(a["texts"], b["texts"]))
            ratio = sa["output_tokens_per_s"] / sb["output_tokens_per_s"] if sb["output_tokens_per_s"] else float("inf")
            ttft = (sb["ttft_p99_s"] / sa["ttft_p99_s"]) if sa["ttft_p99_s"] and sb["ttft_p99_s"] else None
            print(f"rate {rate:g}: output tokens/s {ratio:.2f}x transformers; p99 TTFT "
                  f"{'-' if ttft is None else f'{ttft:.1f}x lower'}; greedy texts identical {same}/{len(a['texts'])}, "
                  f"one a prefix of the other {prefix}/{len(a['texts'])} (a stream that ends in an incomplete "
                  f"character may drop it)")
    if args.out:
        from framework.report import write_bench_json

        write_bench_json({"bench": "serve", "args": vars(args),
                          "results": {n: {str(r): v for r, v in res.items()} for n, res in results.items()}}, args.out)
    shutil.rmtree(work, ignore_errors=True)  # the built model and the servers' logs (kept when a server failed)


if __name__ == "__main__":
    main()
