"""The batch generation job behind ``python -m framework.generate``.

Rank 0 reads and tokenizes the requests, every stage loads its own tensors, batches run through the pipeline,
and the last stage's results come back to rank 0, which writes them (JSONL) and the summary.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from framework.checkpoint.convert import export_step_dir
from framework.cli import UserError
from framework.config import GenerateConfig
from framework.data.tokenizer import load_tokenizer
from framework.infer.cpu_linear import pack_linears, packing_available
from framework.infer.loader import DTYPES, load_stage, read_model_args, resolve_model_dir, rss_mb
from framework.infer.pipeline import Request, StageRunner
from framework.infer.plan import format_plan, plan_stages
from framework.infer.sampling import SamplingParams
from framework.parallel.distributed import barrier, broadcast_object, init_distributed, pick_device


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


def generate(cfg) -> dict:
    """Run the job; returns the summary (rank 0) and writes outputs. Every rank calls this."""
    cfg = as_generate_config(cfg)
    inf = cfg.infer
    if inf.dtype not in DTYPES:
        raise UserError(f"infer.dtype={inf.dtype}: use fp32, bf16 or fp16")
    model_dir, export_from = resolve_model_dir(cfg.model_dir)
    if export_from is None:
        args = read_model_args(model_dir)
    device = pick_device(inf.device)
    rank, world = init_distributed(device, inf.backend, inf.timeout_s)
    if world != inf.pp:
        raise UserError(f"infer.pp={inf.pp} but {world} processes were launched: use torchrun --nproc_per_node={inf.pp}")
    if export_from is not None:  # a training checkpoint: every rank writes its share of the export first
        if rank == 0:
            print(f"[miaotui] exporting {export_from} -> {model_dir}", file=sys.stderr, flush=True)
        export_step_dir(export_from, model_dir)
        args = read_model_args(model_dir)
    dtype = DTYPES[inf.dtype]
    stages = plan_stages(args, inf.pp, inf.split, torch.tensor([], dtype=dtype).element_size())
    stage = stages[rank]
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if rank == 0 else (lambda s: None)
    say(f"[miaotui] {model_dir}: {args.num_params() / 1e6:.2f}M parameters, {args.n_layers} layers, "
        f"pp={inf.pp}, dtype={inf.dtype}, device={device.type}\n{format_plan(stages)}")

    tokenizer = load_tokenizer(model_dir)
    # Requests are read and checked by rank 0 before any weight is loaded.
    payload = None
    if rank == 0:
        try:
            raw, errors = read_requests(cfg)
            payload = {"requests": [], "errors": errors}
            for r in raw:
                ids = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
                params = sampling_for(r, cfg)
                if not ids:
                    errors.append({"line": r["line"], "error": f"line {r['line']}: empty prompt"})
                elif len(ids) + params.max_new_tokens > args.max_seq_len:
                    errors.append({"line": r["line"], "error":
                                   f"prompt of {len(ids)} tokens + max_new_tokens={params.max_new_tokens} exceeds the "
                                   f"model's context of {args.max_seq_len}: shorten the prompt or lower max_new_tokens"})
                else:
                    payload["requests"].append((r["line"], ids, params, r.get("id")))
            if cfg.prompt is not None and errors:
                raise UserError(errors[0]["error"])
        except UserError as exc:
            payload = {"fatal": str(exc)}
    payload = broadcast_object(payload)
    if "fatal" in payload:
        raise UserError(payload["fatal"])
    for e in payload["errors"]:
        say(f"[miaotui] skipped: {e['error']}")

    rss0 = rss_mb()
    t_load = time.perf_counter()
    model = load_stage(model_dir, args, stage, device, dtype)
    n_micro = inf.micro_batches or inf.pp
    if inf.packed_weights and packing_available(dtype, device):
        batch_rows = min(inf.batch_size, max(len(payload["requests"]), 1))
        pack_linears(model, rows_hint=-(-batch_rows // n_micro))  # the rows of one decode micro-batch
    loaded_mb = rss_mb() - rss0
    mem = [None] * world
    dist.all_gather_object(mem, {"stage": rank, "weights_mb": stage.bytes / 2**20, "rss_delta_mb": loaded_mb})
    say("[miaotui] loaded in {:.2f}s; per stage: {}".format(time.perf_counter() - t_load, ", ".join(
        f"stage {m['stage']} weights {m['weights_mb']:.1f} MiB / memory +{m['rss_delta_mb']:.1f} MiB" for m in mem)))

    runner = StageRunner(model, rank, inf.pp, device, dtype, tokenizer=tokenizer, eos_id=tokenizer.eos_token_id,
                         pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    requests = [Request(i, ids, params) for i, (_, ids, params, _) in enumerate(payload["requests"])]
    bar = None
    if rank == 0 and inf.progress and len(requests) > inf.batch_size:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc="generate", file=sys.stderr)
    barrier()
    t0 = time.perf_counter()
    results = []
    decode = [0, 0.0]  # tokens after each row's first, and the seconds from a batch's first token to its last
    for b in range(0, len(requests), inf.batch_size):
        out = runner.run_batch(requests[b: b + inf.batch_size], n_micro, on_done=bar.update if bar else None)
        if runner.last and out is not None:
            results += [{"index": st.request.index, "ids": st.generated, "finish_reason": st.finish_reason,
                         "text": st.text if st.text else None,
                         "ttft_s": (st.t_first - t0) if st.t_first else None,
                         "tpot_s": ((st.t_last - st.t_first) / (len(st.generated) - 1)) if len(st.generated) > 1 else None}
                        for st in out]
            firsts = [st.t_first for st in out if st.t_first]
            if firsts:
                decode[0] += sum(max(len(st.generated) - 1, 0) for st in out)
                decode[1] += max(st.t_last for st in out if st.t_last) - min(firsts)
    wall = time.perf_counter() - t0
    if bar:
        bar.close()
    busy = [None] * world
    dist.all_gather_object(busy, runner.busy_s / wall if wall > 0 else 0.0)
    if inf.pp > 1:  # results live on the last stage
        box = [(results, decode)]
        if rank == inf.pp - 1:
            dist.send_object_list(box, dst=0)
        elif rank == 0:
            dist.recv_object_list(box, src=inf.pp - 1)
        results, decode = box[0]
    if rank != 0:
        return {}

    results.sort(key=lambda r: r["index"])
    lines = []
    for r in results:
        line, ids, params, rid = payload["requests"][r["index"]]
        text = r["text"] if r["text"] is not None else tokenizer.decode(r["ids"], skip_special_tokens=True)
        lines.append({"line": line, **({"id": rid} if rid is not None else {}), "prompt": tokenizer.decode(ids),
                      "text": text, "token_ids": r["ids"], "finish_reason": r["finish_reason"],
                      "ttft_s": r["ttft_s"], "tpot_s": r["tpot_s"]})
    lines += payload["errors"]
    lines.sort(key=lambda x: x["line"])
    n_tokens = sum(len(r["ids"]) for r in results)
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    tpots = [r["tpot_s"] for r in results if r["tpot_s"] is not None]
    summary = {
        "requests": len(results), "errors": len(payload["errors"]), "generated_tokens": n_tokens,
        "wall_s": wall, "tokens_per_s": n_tokens / wall if wall > 0 else 0.0,
        # steady-state decode: the tokens after each row's first over the time from a batch's first token to its last
        "decode_tokens_per_s": decode[0] / decode[1] if decode[1] > 0 else None,
        "ttft_s": sum(ttfts) / len(ttfts) if ttfts else None, "tpot_s": sum(tpots) / len(tpots) if tpots else None,
        "stage_busy_fraction": busy, "pp": inf.pp, "micro_batches": n_micro, "stage_memory": mem,
    }
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
    say("[miaotui] {} requests, {} tokens in {:.2f}s: {:.1f} tok/s, ttft {}, tpot {}, stage busy {}".format(
        summary["requests"], n_tokens, wall, summary["tokens_per_s"],
        f"{summary['ttft_s'] * 1e3:.1f} ms" if summary["ttft_s"] is not None else "-",
        f"{summary['tpot_s'] * 1e3:.2f} ms" if summary["tpot_s"] is not None else "-",
        " ".join(f"{b:.2f}" for b in busy)))
    if inf.summary:
        with open(inf.summary, "w") as f:
            json.dump(summary, f, indent=1)
    summary["outputs"] = lines
    return summary


def as_dictconfig(cfg) -> DictConfig:
    return OmegaConf.structured(cfg)
