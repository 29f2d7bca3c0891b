"""The batch generation job behind ``python -m framework.generate``.

Rank 0 reads and tokenizes the requests (a request that can never fit gets its own error line), every stage loads
its own tensors and sizes its KV cache, then all requests go to the engine's scheduler at once: continuous
batching admits them as slots free up. Rank 0 holds the results, writes them (JSONL) and the summary.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from framework.cli import UserError
from framework.config import GenerateConfig
from framework.infer.engine import Engine
from framework.infer.loader import rss_mb, weight_bytes
from framework.infer.sampler import SamplingParams
from framework.infer.scheduler import Request
from framework.infer.startup import StageSetup, build_engine, start_stage_ranks
from framework.parallel.distributed import barrier, broadcast_object


def as_generate_config(cfg) -> GenerateConfig:
    if isinstance(cfg, GenerateConfig):
        return cfg
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(GenerateConfig), cfg))


def read_requests(cfg: GenerateConfig) -> tuple[list[dict], list[dict]]:
    """(requests, errors): each request keeps its line number; a malformed line becomes an error entry."""
    if cfg.prompt is not None and cfg.prompts is not None:
        raise UserError("give prompt= or prompts=, not both")
    if cfg.prompt is not None:
        return [{"line": 0, "prompt": cfg.prompt}], []
    if cfg.prompts is None:
        raise UserError("nothing to generate: give prompt=\"...\" or prompts=requests.jsonl")
    if not os.path.isfile(cfg.prompts):
        raise UserError(f"prompts file not found: {cfg.prompts}")
    requests, errors = [], []
    with open(cfg.prompts) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                    raise ValueError('expected an object with a string "prompt" field')
            except ValueError as exc:
                errors.append({"line": n, "error": f"malformed JSONL line {n}: {str(exc).splitlines()[0]}"})
                continue
            obj["line"] = n
            requests.append(obj)
    return requests, errors


def sampling_for(req: dict, cfg: GenerateConfig) -> SamplingParams:
    inf = cfg.infer
    stop = req.get("stop", list(inf.stop))
    return SamplingParams(
        temperature=float(req.get("temperature", inf.temperature)), top_k=int(req.get("top_k", inf.top_k)),
        top_p=float(req.get("top_p", inf.top_p)),
        repetition_penalty=float(req.get("repetition_penalty", inf.repetition_penalty)),
        max_new_tokens=int(req.get("max_new_tokens", inf.max_new_tokens)), seed=int(req.get("seed", inf.seed)),
        stop=tuple([stop] if isinstance(stop, str) else stop),
        ignore_eos=bool(req.get("ignore_eos", inf.ignore_eos)),
    )


def validate_requests(raw: list[dict], cfg: GenerateConfig, tokenizer, context: int) -> tuple[list, list[dict], int]:
    """(requests (line, ids, params, id), errors, KV length a slot needs). A request that can never fit gets its
    own error; the others are served."""
    inf = cfg.infer
    limit = min(context, inf.max_seq_len) if inf.max_seq_len else context
    requests, errors = [], []
    for r in raw:
        n = r["line"]
        try:
            params = sampling_for(r, cfg)
        except (TypeError, ValueError) as exc:
            errors.append({"line": n, "error": f"line {n}: {exc}"})
            continue
        ids = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        if not ids:
            errors.append({"line": n, "error": f"line {n}: empty prompt"})
        elif params.max_new_tokens < 1:
            errors.append({"line": n, "error": f"line {n}: max_new_tokens={params.max_new_tokens}: ask for at least 1"})
        elif len(ids) + params.max_new_tokens > limit:
            what = "the model's context" if limit == context else "infer.max_seq_len"
            errors.append({"line": n, "error": f"line {n}: prompt of {len(ids)} tokens + max_new_tokens="
                                               f"{params.max_new_tokens} exceeds {what} of {limit}: shorten the prompt "
                                               f"or lower max_new_tokens"})
        else:
            requests.append((n, ids, params, r.get("id")))
    need = max((len(ids) + p.max_new_tokens for _, ids, p, _ in requests), default=1)
    max_len = inf.max_seq_len or min(-(-need // 16) * 16, context)
    return requests, errors, max_len


def read_payload(cfg: GenerateConfig, tokenizer, context: int, rank: int) -> dict:
    """Rank 0 reads and checks the requests before any weight is loaded; every rank gets the outcome:
    {"requests", "errors", "max_len"}, or a UserError raised on every rank."""
    payload = None
    if rank == 0:
        try:
            raw, errors = read_requests(cfg)
            requests, more_errors, max_len = validate_requests(raw, cfg, tokenizer, context)
            errors += more_errors
            payload = {"requests": requests, "errors": errors, "max_len": max_len}
            if cfg.prompt is not None and errors:
                raise UserError(errors[0]["error"])
        except UserError as exc:
            payload = {"fatal": str(exc)}
    payload = broadcast_object(payload)
    if "fatal" in payload:
        raise UserError(payload["fatal"])
    return payload


def load_engine(st: StageSetup, inf, payload: dict) -> tuple[Engine, list[dict], float]:
    """Build this rank's engine, then tell (rank 0) how long the load took and what each rank holds.
    Returns the engine, every rank's memory entry and the model's size in MiB."""
    rss0 = rss_mb()
    t_load = time.perf_counter()
    engine, _ = build_engine(inf, st.model_dir, st.args, st.stages, st.rank, st.device, st.dtype,
                             len(payload["requests"]), payload["max_len"], st.tokenizer, st.say)
    loaded_mb = rss_mb() - rss0
    mem = [None] * st.world
    dist.all_gather_object(mem, {"rank": st.rank, "stage": st.rank // inf.tp, "tp_rank": st.rank % inf.tp,
                                 "weights_mb": weight_bytes(engine.worker.w) / 2**20, "rss_delta_mb": loaded_mb})
    model_mb = sum(s.bytes for s in st.stages) / 2**20
    st.say("[miaotui] loaded in {:.2f}s; model {:.1f} MiB; per rank: {}".format(
        time.perf_counter() - t_load, model_mb, ", ".join(
            f"rank {m['rank']} (stage {m['stage']}, tp {m['tp_rank']}) weights {m['weights_mb']:.1f} MiB "
            f"({m['weights_mb'] / model_mb:.2f} of the model) / memory +{m['rss_delta_mb']:.1f} MiB" for m in mem)))
    return engine, mem, model_mb


def run_requests(engine: Engine, requests: list, inf, rank: int, world: int) -> tuple[list, float, float, list[float]]:
    """Every request to the scheduler at once (rank 0), the engine run until all have finished (every rank).
    Returns the finished sequences (rank 0), when they were submitted, the wall time and each rank's busy share."""
    finished = []
    bar = None
    if rank == 0:
        if inf.progress and len(requests) > 16:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="generate", file=sys.stderr)

        def on_finish(seq):
            finished.append(seq)
            if bar:
                bar.update(1)

        engine.scheduler.on_finish = on_finish
    barrier()
    t0 = time.perf_counter()
    if rank == 0:
        for i, (_, ids, params, _) in enumerate(requests):
            engine.scheduler.add(Request(i, ids, params, arrival=t0))
    engine.run()
    wall = time.perf_counter() - t0
    if bar:
        bar.close()
    busy = [None] * world
    dist.all_gather_object(busy, engine.worker.busy_s / wall if wall > 0 else 0.0)
    return finished, t0, wall, busy


def result_lines(finished: list, payload: dict, tokenizer, t0: float) -> list[dict]:
    """One output line per request (its text, tokens and timings) or per error, in the input's order."""
    finished.sort(key=lambda s: s.request.index)
    lines = []
    for s in finished:
        line, ids, params, rid = payload["requests"][s.request.index]
        text = s.text if s.text is not None else tokenizer.decode(s.generated, skip_special_tokens=True)
        n = len(s.generated)
        lines.append({"line": line, **({"id": rid} if rid is not None else {}), "prompt": tokenizer.decode(ids),
                      "text": text, "token_ids": s.generated, "finish_reason": s.finish_reason,
                      "ttft_s": s.t_first - t0, "tpot_s": (s.t_last - s.t_first) / (n - 1) if n > 1 else None,
                      "latency_s": s.t_done - t0})
    lines += payload["errors"]
    lines.sort(key=lambda x: x["line"])
    return lines


def summarize(finished: list, lines: list[dict], n_errors: int, wall: float, busy: list[float], engine: Engine,
              inf, mem: list[dict], model_mb: float) -> dict:
    """The job's summary: counts, throughput, latencies, each stage's busy share and memory."""
    n_tokens = sum(len(s.generated) for s in finished)
    decode_tokens = sum(max(len(s.generated) - 1, 0) for s in finished)  # a stop string can cut to 0 tokens
    decode_span = (max(s.t_last for s in finished) - min(s.t_first for s in finished)) if finished else 0.0
    ttfts = [x["ttft_s"] for x in lines if x.get("ttft_s") is not None]
    tpots = [x["tpot_s"] for x in lines if x.get("tpot_s") is not None]
    latencies = sorted(x["latency_s"] for x in lines if x.get("latency_s") is not None)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

    return {
        "requests": len(finished), "errors": n_errors, "generated_tokens": n_tokens,
        "wall_s": wall, "tokens_per_s": n_tokens / wall if wall > 0 else 0.0,
        # steady-state decode: the tokens after each row's first over the time from the first token to the last
        "decode_tokens_per_s": decode_tokens / decode_span if decode_span > 0 else None,
        "ttft_s": sum(ttfts) / len(ttfts) if ttfts else None, "tpot_s": sum(tpots) / len(tpots) if tpots else None,
        "latency_p50_s": pct(latencies, 0.5), "latency_p99_s": pct(latencies, 0.99),
        "stage_busy_fraction": busy, "pp": inf.pp, "tp": inf.tp, "model_mb": model_mb,
        "micro_batches": inf.micro_batches or inf.pp,
        "steps": engine.steps, "stage_memory": mem,
        **spec_summary(engine.scheduler, inf),
    }


def write_outputs(cfg: GenerateConfig, lines: list[dict]) -> None:
    """The lines as JSONL to ``output``; without one, each request's prompt and text to stdout."""
    if cfg.output:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
        with open(cfg.output, "w") as f:
            for x in lines:
                f.write(json.dumps(x) + "\n")
    else:
        for x in lines:
            if "error" in x:
                continue
            print(f"{x['prompt']}\033[1m{x['text']}\033[0m" if sys.stdout.isatty() else x["prompt"] + x["text"])


def generate(cfg) -> dict:
    """Run the job; returns the summary (rank 0) and writes outputs. Every rank calls this."""
    cfg = as_generate_config(cfg)
    inf = cfg.infer
    st = start_stage_ranks(cfg.model_dir, inf)
    payload = read_payload(cfg, st.tokenizer, st.args.max_seq_len, st.rank)
    for e in payload["errors"]:
        st.say(f"[miaotui] skipped: {e['error']}")
    engine, mem, model_mb = load_engine(st, inf, payload)
    finished, t0, wall, busy = run_requests(engine, payload["requests"], inf, st.rank, st.world)
    if st.rank != 0:
        return {}
    lines = result_lines(finished, payload, st.tokenizer, t0)
    summary = summarize(finished, lines, len(payload["errors"]), wall, busy, engine, inf, mem, model_mb)
    write_outputs(cfg, lines)
    st.say("[miaotui] {} requests, {} tokens in {:.2f}s: {:.1f} tok/s, ttft {}, tpot {}, stage busy {}".format(
        summary["requests"], summary["generated_tokens"], wall, summary["tokens_per_s"],
        f"{summary['ttft_s'] * 1e3:.1f} ms" if summary["ttft_s"] is not None else "-",
        f"{summary['tpot_s'] * 1e3:.2f} ms" if summary["tpot_s"] is not None else "-",
        " ".join(f"{b:.2f}" for b in busy)))
    if inf.summary:
        with open(inf.summary, "w") as f:
            json.dump(summary, f, indent=1)
    summary["outputs"] = lines
    return summary


def spec_summary(scheduler, inf) -> dict:
    """Speculative decoding's part of the summary: the proposer, the drafts verified and kept, their rate, the
    tokens a verification emits on average, and the steps that did not speculate because their batch was large."""
    if inf.speculative == "none":
        return {"speculative": "none"}
    st = scheduler.spec
    return {"speculative": inf.speculative, "num_speculative_tokens": inf.num_speculative_tokens,
            "draft_tokens": st.proposed, "accepted_tokens": st.accepted, "acceptance_rate": st.acceptance_rate,
            "mean_accepted_length": st.mean_accepted_length, "verify_steps": st.steps,
            "spec_skipped_steps": scheduler.spec_skipped_steps}


def as_dictconfig(cfg) -> DictConfig:
    return OmegaConf.structured(cfg)
