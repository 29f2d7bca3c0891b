"""Inference benchmark: one run, the same model and machine, baselines measured alongside.

(a) our pp=1 decode tokens/s against transformers ``generate()`` at batch 1 and 8;
(b) pp=2 with micro-batches against pp=1 on the same batch (256 requests decoded together), one thread per
    process, and a naive layer split without micro-batches (what ``device_map="auto"`` does: one batch walks
    the stages in turn);
(c) defaults: 128 requests x 48 new tokens, pp=2 against pp=1 with no batch knob set;
(d) continuous batching against static batching (the same max_batch, a group runs until its last row is done):
    256 requests whose output lengths vary (geometric, mean 48, at most 256), tokens/s and p50/p99 latency,
    at pp=1 and pp=2;
(f) tensor parallelism: batch-1 and batch-8 decode, tp=2 against tp=1 (and tp=2 with gloo's all-reduce instead of
    DeepSpeed's shared-memory one); pp=2 against tp=2 at batch 128, which to pick when;
(e) close to the limit: batch-1 decode, tokens/s times the bytes a token reads (weights and KV), as a share of
    the read bandwidth measured in the same run with as many threads as the decode, eager and compiled (CPU: fp32,
    one thread and every core; GPU: the 1B flavor in bf16, beside transformers generate() with a static cache and
    torch.compile).
Every case runs --repeats times (3), interleaved with its baseline, so that slow spells of a shared machine fall on
both; the table gives medians, and the range of the per-round ratios. The table, every round's figures (JSON) and
the plots (throughput against batch size and layout, latency CDFs of (d); ``framework.report``) go beside ``--out``.

    python scripts/bench_infer.py                 # CPU: (a) the CPU default's shape and a 30M Llama; (b)-(e) the 30M
    python scripts/bench_infer.py --only d        # one part
    python scripts/bench_infer.py --flavor 1b     # GPU: the 1B flavor in bf16, (a) and (e)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SHAPES = {
    # the CPU default's shape (configs/model/small.yaml): per-token overhead dominates
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
    # large enough that compute and weight reads dominate Python overhead on CPU
    "30m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}


PART_TITLES = {  # the plots' panel titles
    "a": "(a) pp=1 decode: ours against transformers generate()",
    "b": "(b) one batch of every request: pp=2 against pp=1",
    "c": "(c) defaults, 128 requests x 48 tokens",
    "d": "(d) continuous against static batching, max_batch 64",
    "e": "(e) batch-1 decode against the read-bandwidth limit",
    "f": "(f) tensor parallelism: decode, and pp=2 against tp=2",
}


def make_model(path: str, flavor: str) -> None:
    import transformers

    from framework.data.synthetic import make_examples
    from framework.data.tokenizer import train_bpe

    tok = train_bpe([e.text for e in make_examples("reverse", 2000, 0, 3, 8)], 300)
    shape = {"vocab_size": len(tok), **SHAPES[flavor]}
    cfg = transformers.LlamaConfig(**shape, max_position_embeddings=4096, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    if flavor == "1b":
        model = model.to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def run_ours(path, pp, batch, new, micro, dtype, device, prompts_file, extra=(), tp=1, threads=1) -> dict:
    """One framework.generate job (pp x tp processes, ``threads`` each); batch/micro None leave the defaults.
    Returns its summary."""
    summary = os.path.join(os.path.dirname(prompts_file), f"s-{pp}-{tp}-{batch}-{micro}.json")
    knobs = ([f"infer.max_batch={batch}"] if batch else []) + ([f"infer.micro_batches={micro}"] if micro else [])
    args = [f"model_dir={path}", f"prompts={prompts_file}", f"output={summary}.jsonl", f"infer.pp={pp}",
            f"infer.tp={tp}", *knobs,
            f"infer.max_new_tokens={new}", "infer.ignore_eos=true", f"infer.dtype={dtype}", f"infer.device={device}",
            f"infer.summary={summary}", "infer.progress=false", *extra]
    launcher = [sys.executable, "-m"] if pp * tp == 1 else [os.path.join(os.path.dirname(sys.executable), "torchrun"),
                                                           "--standalone", f"--nproc_per_node={pp * tp}", "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": REPO, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([*launcher, "framework.generate", *args], env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    with open(summary) as f:
        result = json.load(f)
    with open(f"{summary}.jsonl") as f:  # every request's timings, for the latency CDFs of (d)
        result["latencies_s"] = [r["latency_s"] for r in map(json.loads, f) if r.get("latency_s") is not None]
    return result


def run_hf(path, batch, new, dtype, device, prompts) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    total, t_all = 0, 0.0
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i: i + batch], return_tensors="pt", padding=True).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        if device == "cuda":
            torch.cuda.synchronize()
        t_all += time.perf_counter() - t0
        total += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    return total / t_all


def ratio_cell(ours: list[float], base: list[float]) -> str:
    """The ratio of the medians, and the range of the per-round ratios when there were several rounds."""
    ratios = [o / b for o, b in zip(ours, base)]
    spread = f" (rounds {min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
    return f"{statistics.median(ours) / statistics.median(base):.2f}x{spread}"


def read_bandwidth_gbs(device: str, threads: int = 1) -> float:
    """What ``threads`` threads (CPU) or the device (GPU) read per second: the best of several sums of 1 GiB."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.ones(2**28, dtype=torch.float32, device=device)
    best = 0.0
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.sum()
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    torch.set_num_threads(before)
    return best


def bytes_per_token(path: str, dtype_bytes: int, context: int) -> float:
    """Bytes a batch-1 decode step reads: every weight but the embedding table (one row of it), and the KV
    cache up to the average context."""
    from framework.infer.loader import read_model_args

    args = read_model_args(path)
    weights = args.num_params(include_embedding=False) + args.dim
    if args.tie_embeddings:
        weights += args.vocab_size * args.dim  # the head reads the shared table
    kv = 2 * args.n_layers * args.kv_heads * args.head_dim * context
    return (weights + kv) * dtype_bytes


def hf_static_compiled(path, new, dtype, device, prompt) -> float:
    """transformers generate() with a static cache, which it compiles itself on CUDA (CUDA graphs), batch 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    enc = tok([prompt], return_tensors="pt").to(device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static",
              pad_token_id=tok.pad_token_id)
    for _ in range(2):  # compile and warm the graphs
        model.generate(**enc, **kw)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(**enc, **kw)
    torch.cuda.synchronize()
    return new / (time.perf_counter() - t0)


def write_prompts(path: str, prompts: list[str], **fields) -> str:
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            row = {"prompt": p, **{k: (v[i] if isinstance(v, list) else v) for k, v in fields.items()}}
            f.write(json.dumps(row) + "\n")
    return path


def med(xs):
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavor", default="cpu", choices=["cpu", "1b"])
    ap.add_argument("--only", default=None, choices=["a", "b", "c", "d", "e", "f"], help="run one part")
    ap.add_argument("--shapes", default="small,30m", help="CPU: the model shapes of (a); (b)-(e) use the last")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--requests", type=int, default=256, help="(b): requests, all decoded as one batch")
    ap.add_argument("--repeats", type=int, default=None,
                    help="rounds over the configurations, interleaved (medians reported); 3 on CPU, 1 on a GPU")
    ap.add_argument("--out", default=None, help="the JSON of every round (the table .md and the PNGs beside it); "
                    "default runs/bench_infer/bench_infer[_<flavor>][_<part>].json")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a.repeats = a.repeats or (3 if device == "cpu" else 1)
    dtype = "bf16" if a.flavor == "1b" else "fp32"
    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    tmp = tempfile.mkdtemp(prefix="bench_infer_")
    flavors = a.shapes.split(",") if a.flavor == "cpu" else [a.flavor]
    for f in flavors:
        make_model(os.path.join(tmp, f), f)
    path = os.path.join(tmp, flavors[-1])
    prompts = [f"reverse: {' '.join(str((i * 7 + j) % 10) for j in range(3 + i % 6))} =" for i in range(a.requests)]
    pfile = write_prompts(os.path.join(tmp, "prompts.jsonl"), prompts)
    cpu = device == "cpu"
    want = (lambda part: a.only in (None, part))
    rows = []
    cases = []  # every round's figures, for the JSON and the plots (framework/report/bench.py reads them)
    for flavor in flavors if want("a") else []:
        for batch in (1, 8):
            n = 4 if batch == 1 else 64  # runs of a few seconds at least: shorter ones are at the mercy of the VM
            sub = write_prompts(os.path.join(tmp, f"p{batch}.jsonl"), prompts[:n])
            model = os.path.join(tmp, flavor)
            hf, ours, plain = [], [], []
            for _ in range(a.repeats):  # interleaved, as in (b)
                hf.append(run_hf(model, batch, a.new, tdtype, device, prompts[:n]))
                ours.append(run_ours(model, 1, batch, a.new, 1, dtype, device, sub)["tokens_per_s"])
                if cpu and flavor == "30m":  # what packing the fp32 weights adds
                    plain.append(run_ours(model, 1, batch, a.new, 1, dtype, device, sub,
                                          ["infer.packed_weights=false"])["tokens_per_s"])
            for system, values in (("miaotui", ours), ("transformers generate()", hf), ("miaotui, unpacked weights", plain)):
                if values:
                    cases.append({"part": "a", "series": f"{system} ({flavor})", "batch": batch, "pp": 1,
                                  "metric": "tokens_per_s", "values": values})
            rows.append((f"(a) {flavor} pp=1 decode, batch {batch}", f"{med(ours):.1f}",
                         f"transformers generate(): {med(hf):.1f}", ratio_cell(ours, hf)))
            if plain:
                rows.append(("    the same without packed weights", f"{med(plain):.1f}",
                             f"transformers generate(): {med(hf):.1f}", ratio_cell(plain, hf)))
    if cpu and want("b"):
        # Each configuration runs --repeats times, interleaved, so that a slow spell of this shared machine falls on
        # all of them alike; the table gives medians and the spread of the per-round ratios.
        configs = [("pp=1", 1, 1), ("(b) pp=2 naive split (1 micro-batch)", 2, 1), ("(b) pp=2, 2 micro-batches", 2, 2),
                   ("(b) pp=2, 3 micro-batches", 2, 3)]
        runs = {name: [] for name, _, _ in configs}
        for _ in range(a.repeats):
            for name, pp, micro in configs:
                runs[name].append(run_ours(path, pp, a.requests, a.new, micro, dtype, device, pfile))
        base = runs["pp=1"]
        for name, pp, micro in configs:
            for key in ("tokens_per_s", "decode_tokens_per_s"):
                cases.append({"part": "b", "label": name.replace("(b) ", ""), "pp": pp,
                              "micro": micro, "batch": a.requests, "metric": key, "values": [r[key] for r in runs[name]]})
        for name, _, _ in configs[1:]:
            rs = runs[name]
            for key, label in (("tokens_per_s", name), ("decode_tokens_per_s", "    decode only (after the first token)")):
                busy = ("  busy " + "/".join(f"{med(x):.2f}" for x in zip(*(r["stage_busy_fraction"] for r in rs)))
                        if key == "tokens_per_s" else "")
                rows.append((label, f"{med([r[key] for r in rs]):.1f}",
                             f"pp=1 same batch: {med([b[key] for b in base]):.1f}",
                             ratio_cell([r[key] for r in rs], [b[key] for b in base]) + busy))
    if cpu and want("c"):  # the defaults: no batch or micro-batch knob
        sub = write_prompts(os.path.join(tmp, "c.jsonl"), prompts[:128])
        one, two = [], []
        for _ in range(a.repeats):
            one.append(run_ours(path, 1, None, 48, None, dtype, device, sub)["tokens_per_s"])
            two.append(run_ours(path, 2, None, 48, None, dtype, device, sub)["tokens_per_s"])
        cases += [{"part": "c", "label": f"pp={pp}, defaults", "pp": pp, "batch": 128, "metric": "tokens_per_s",
                   "values": v} for pp, v in ((1, one), (2, two))]
        rows.append(("(c) defaults: 128 requests x 48, pp=2", f"{med(two):.1f}", f"pp=1 defaults: {med(one):.1f}",
                     ratio_cell(two, one)))
    if cpu and want("d"):  # continuous against static batching, output lengths that vary
        import random

        rng = random.Random(0)
        lengths = [min(256, 1 + int(rng.expovariate(1 / 47.5))) for _ in range(256)]
        sub = write_prompts(os.path.join(tmp, "d.jsonl"), [prompts[i % len(prompts)] for i in range(256)],
                            max_new_tokens=lengths)
        runs = {(pp, pol): [] for pp in (1, 2) for pol in ("continuous", "static")}
        for _ in range(a.repeats):
            for pp, pol in runs:
                runs[(pp, pol)].append(run_ours(path, pp, 64, 256, None, dtype, device, sub, [f"infer.scheduler={pol}"]))
        for (pp, pol), rs in runs.items():
            cases.append({"part": "d", "label": f"{pol}, pp={pp}", "pp": pp, "scheduler": pol, "batch": 64,
                          "metric": "tokens_per_s", "values": [r["tokens_per_s"] for r in rs],
                          "latencies_s": [x for r in rs for x in r["latencies_s"]]})
        for pp in (1, 2):
            c, st = runs[(pp, "continuous")], runs[(pp, "static")]

            def lat(rs):
                return f"p50 {med([r['latency_p50_s'] for r in rs]):.1f} s, p99 {med([r['latency_p99_s'] for r in rs]):.1f} s"

            rows.append((f"(d) continuous, pp={pp}, max_batch 64", f"{med([r['tokens_per_s'] for r in c]):.1f}",
                         f"static: {med([r['tokens_per_s'] for r in st]):.1f}",
                         ratio_cell([r["tokens_per_s"] for r in c], [r["tokens_per_s"] for r in st])))
            rows.append(("    request latency", "", f"static: {lat(st)}", f"continuous: {lat(c)}"))
    if want("e"):  # batch-1 decode against the read-bandwidth limit
        # the bandwidth is read with the threads the decode runs with: one (the other cases' setting), and on a
        # CPU also every core, the machine's whole read bandwidth
        sub = write_prompts(os.path.join(tmp, "e.jsonl"), prompts[:1])
        per_token = bytes_per_token(path, 2 if dtype == "bf16" else 4, context=8 + a.new // 2)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        thread_counts = [1, cores] if cpu and cores > 1 else [1]
        for threads in thread_counts:
            results = {"eager": [], "compiled": [], "bw": [], "hf": []}
            for _ in range(a.repeats):
                results["bw"].append(read_bandwidth_gbs(device, threads))
                for mode in ("eager", "compiled"):
                    results[mode].append(run_ours(path, 1, 1, a.new, None, dtype, device, sub,
                                                  [f"infer.compile={str(mode == 'compiled').lower()}"],
                                                  threads=threads)["decode_tokens_per_s"])
                if not cpu:
                    results["hf"].append(hf_static_compiled(path, a.new, tdtype, device, prompts[0]))
            bw = med(results["bw"])
            where = f", {threads} thread{'s' if threads > 1 else ''}" if cpu else ""
            for label, values in (("eager", results["eager"]), ("compiled", results["compiled"]),
                                  ("transformers, static cache", results["hf"]),
                                  ("read-bandwidth limit", [b * 1e9 / per_token for b in results["bw"]])):
                if values:
                    cases.append({"part": "e", "label": label + where, "batch": 1, "threads": threads,
                                  "metric": "decode_tokens_per_s", "values": values})
            for mode in ("eager", "compiled"):
                tps = med(results[mode])
                shares = [t * per_token / (b * 1e9) for t, b in zip(results[mode], results["bw"])]
                rows.append((f"(e) batch-1 decode, {mode}{where}", f"{tps:.1f}",
                             f"limit {bw * 1e9 / per_token:.1f} ({bw:.1f} GB/s read, {per_token / 1e6:.1f} MB/token)",
                             f"{tps * per_token / (bw * 1e9):.0%} of the read bandwidth (rounds "
                             f"{min(shares):.0%}-{max(shares):.0%})"))
            if results["hf"]:
                tps = med(results["hf"])
                rows.append(("    transformers, static cache + compile", f"{tps:.1f}", "",
                             f"{tps * per_token / (bw * 1e9):.0%}"))
    if cpu and want("f"):  # tensor parallelism: one request faster; and pp against tp for throughput
        for batch in (1, 8):
            sub = write_prompts(os.path.join(tmp, f"f{batch}.jsonl"), prompts[:batch])
            one, two, gloo = [], [], []
            for _ in range(a.repeats):
                one.append(run_ours(path, 1, batch, a.new, None, dtype, device, sub)["decode_tokens_per_s"])
                two.append(run_ours(path, 1, batch, a.new, None, dtype, device, sub, tp=2)["decode_tokens_per_s"])
                gloo.append(run_ours(path, 1, batch, a.new, None, dtype, device, sub, ["infer.allreduce=backend"],
                                     tp=2)["decode_tokens_per_s"])
            for series, tp, values in (("tp=1", 1, one), ("tp=2", 2, two), ("tp=2, gloo all-reduce", 2, gloo)):
                cases.append({"part": "f", "series": series, "tp": tp, "batch": batch, "metric": "decode_tokens_per_s",
                              "values": values})
            rows.append((f"(f) tp=2 decode, batch {batch}", f"{med(two):.1f}", f"tp=1: {med(one):.1f}",
                         ratio_cell(two, one)))
            rows.append(("    tp=2 with gloo's all-reduce", f"{med(gloo):.1f}", f"tp=1: {med(one):.1f}",
                         ratio_cell(gloo, one)))
        sub = write_prompts(os.path.join(tmp, "f128.jsonl"), prompts[:128])
        pp2, tp2 = [], []
        for _ in range(a.repeats):
            pp2.append(run_ours(path, 2, None, 48, None, dtype, device, sub)["tokens_per_s"])
            tp2.append(run_ours(path, 1, None, 48, None, dtype, device, sub, tp=2)["tokens_per_s"])
        cases += [{"part": "f", "label": label, "pp": pp, "tp": tp, "batch": 128, "metric": "tokens_per_s",
                   "values": v} for label, pp, tp, v in (("pp=2", 2, 1, pp2), ("tp=2", 1, 2, tp2))]
        rows.append(("(f) batch 128 x 48: pp=2", f"{med(pp2):.1f}", f"tp=2: {med(tp2):.1f}", ratio_cell(pp2, tp2)))
    name = (torch.cuda.get_device_name() if device == "cuda"
            else f"CPU, {os.cpu_count()} cores, 1 thread/process ((e) also on every core)")
    lines = [f"bench_infer: {a.flavor} model, {a.new} new tokens, {dtype}, {name}",
             f"| {'case':<42} | {'ours tok/s':>10} | {'baseline tok/s':<48} | {'ratio':<42} |",
             f"|{'-' * 44}|{'-' * 12}|{'-' * 50}|{'-' * 44}|"]
    lines += [f"| {r[0]:<42} | {r[1]:>10} | {r[2]:<48} | {r[3]:<42} |" for r in rows]
    print("\n" + "\n".join(lines))
    out = a.out or os.path.join(REPO, "runs", "bench_infer", "bench_infer" + ("" if a.flavor == "cpu" else f"_{a.flavor}")
                                + (f"_{a.only}" if a.only else "") + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out[: -len(".json")] + ".md" if out.endswith(".json") else out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    from framework.report import write_bench_json

    write_bench_json({"bench": "infer", "device": name, "flavor": a.flavor, "dtype": dtype, "new_tokens": a.new,
                      "repeats": a.repeats, "parts": PART_TITLES, "cases": cases}, out)


if __name__ == "__main__":
    main()
