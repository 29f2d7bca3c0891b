"""Speculative decoding benchmark: tokens/s with and without speculation, one table.

Cases (each at batch 1, 4, 16 and 64, ``infer.max_batch`` = the batch, max(batch, 8) requests of ``--max-new`` tokens each):
- ngram/copy: prompt lookup on the synthetic copy task (a model trained on it: the answer repeats the prompt, then
  the request stops at its end of sequence);
- ngram/code-edit: prompt lookup on code-editing prompts (a stdlib function, then the start of its copy with a
  name changed: the continuation is mostly the function again), target trained on stdlib;
- draft/code: the distilled draft (``experiment=distill_stdlib``) on stdlib code prefixes, same target.
"spec" is the default policy (``infer.speculative_policy=cost``: the drafts whose expected tokens pay for their rows,
by the step cost measured at load). Each case also runs with speculation forced on at every batch (the acceptance
policy, ``infer.speculative_max_batch`` past the batch), which shows where verification starts costing more than it
saves, and the decode-step cost against rows ("rows" part)
says why: speculation pays while a step of r x (1 + k) rows costs less than the mean accepted length times a step
of r rows. Beside them, at batch 1 (assisted generation is batch-1 only in transformers), transformers' plain
``generate()`` against ``prompt_lookup_num_tokens`` and ``assistant_model`` on the same models and prompts.

Every case runs ``--repeats`` rounds, speculation and its plain baseline back to back in each round (plain first in
odd rounds, last in even ones), so that a slow spell of a shared machine falls on both; the table gives medians and
the JSON every round.

    python scripts/bench_spec.py --tiny                         # minutes on a CPU: proves the script, not the speed
    python scripts/bench_spec.py --code-target runs/stdlib_30m --draft runs/distill_stdlib --copy-target runs/copy
    python scripts/bench_spec.py                                # trains the three models first (CPU: ~70 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def run(cmd: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def train_models(work: str, tiny: bool) -> dict[str, str]:
    """The copy-task target, the stdlib target and its distilled draft (their export directories)."""
    py = [sys.executable, "-m", "framework.train", "logger.progress=false", "checkpoint.resume=none"]
    steps = ["trainer.max_steps=20", "trainer.warmup_steps=2", "trainer.eval_every=0"] if tiny else []
    corpus = ["data.max_chars=60000"] if tiny else []
    copy_dir, code_dir, draft_dir = (os.path.join(work, n) for n in ("copy", "code", "draft"))
    # the copy target (runs/spec/copy5's recipe, ~25 min here): 2,000 steps, then resumed to 4,500 with the schedule
    # stretched; the loss leaves its plateau (2.3 nats: the prompt's random digits) near step 700 and reaches 1.4 by
    # 3,500, where the model copies the prompt and stops. 400 steps at lr 3e-3 made a model that repeats one digit.
    copy = [f"run_dir={copy_dir}", f"model={'debug' if tiny else 'small'}", "data=synthetic", "data.synthetic.task=copy",
            "data.synthetic.min_len=24", "data.synthetic.max_len=48", "trainer.seq_len=256",
            "trainer.global_batch_size=32", "trainer.micro_batch_size=32", "trainer.lr=1e-3"]
    if tiny:
        run(py + copy + steps)
    else:
        full = ["trainer.eval_every=0", "trainer.warmup_steps=100"]
        run(py + copy + full + ["trainer.max_steps=2000"])
        run([*py[:-1], "checkpoint.resume=latest", *copy, *full, "trainer.max_steps=4500"])
    run(py + [f"run_dir={code_dir}", f"experiment={'stdlib_small' if tiny else 'stdlib_30m'}", *(["model=debug"] if tiny else []),
              *steps, *corpus])
    # the draft on the target's own corpus (4M characters), 1,500 steps (~12 min here): held-out token accuracy 0.41
    # against the target's 0.42, accepted ~60% at batch 1; the experiment's 400 steps on 1M gave 0.32 and ~49%
    draft_full = ["model=small", "data.max_chars=4000000", "trainer.max_steps=1500", "trainer.eval_every=1500",
                  "trainer.warmup_steps=50"]
    run(py + [f"run_dir={draft_dir}", "experiment=distill_stdlib", f"trainer.distill_from={code_dir}/export", *steps,
              *corpus, *(["model.n_layers=1"] if tiny else draft_full)])
    return {"copy": f"{copy_dir}/export", "code": f"{code_dir}/export", "draft": f"{draft_dir}/export"}


def copy_prompts(n: int, seed: int = 1) -> list[str]:
    from framework.data.synthetic import make_examples

    return [e.prompt for e in make_examples("copy", n, seed, 24, 48)]


def stdlib_functions(n: int, seed: int = 0, max_lines: int = 24) -> list[str]:
    """Top-level functions of 6..max_lines lines from the standard library, drawn reproducibly."""
    from framework.data.sources import stdlib_files

    rng = random.Random(seed)
    files = sorted(stdlib_files())
    rng.shuffle(files)
    out = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for m in re.finditer(r"^def \w+\(.*?(?=^\S)", text, re.M | re.S):
            lines = m.group(0).rstrip().splitlines()
            if 6 <= len(lines) <= max_lines:
                out.append("\n".join(lines))
                break
        if len(out) == n:
            break
    return out


def edit_prompts(n: int) -> list[str]:
    """A function, then the first two lines of the same function with its name changed."""
    out = []
    for fn in stdlib_functions(n):
        name = re.match(r"def (\w+)", fn).group(1)
        edited = fn.replace(name, name + "_v2")
        out.append(fn + "\n\n\n" + "\n".join(edited.splitlines()[:2]) + "\n")
    return out


def code_prompts(n: int) -> list[str]:
    return ["\n".join(fn.splitlines()[:3]) + "\n" for fn in stdlib_functions(n, seed=7)]


MIN_REQUESTS = 8  # a batch-1 case runs 8 requests one after another: one request of 128 tokens is ~0.1 s, too noisy
# tasks whose answer ends: the copy target answers with the prompt's digits and an end of sequence, so a request stops
# there (24-48 tokens) rather than running on into new examples of its own; 4x the requests keep a run as long
STOPS = {"copy": 4}


def engine_rate(model: str, prompts: list[str], batch: int, max_new: int, extra: list[str], work: str,
                stops: int = 0) -> dict:
    """One framework.generate run of max(batch, 8) requests at max_batch ``batch`` (``stops``: that many times the
    requests, each stopping at its end of sequence): its summary."""
    src, summary = os.path.join(work, "in.jsonl"), os.path.join(work, "summary.json")
    with open(src, "w") as f:
        for i in range(max(batch, MIN_REQUESTS) * max(stops, 1)):
            f.write(json.dumps({"prompt": prompts[i % len(prompts)]}) + "\n")
    run([sys.executable, "-m", "framework.generate", f"model_dir={model}", f"prompts={src}",
         f"output={os.path.join(work, 'out.jsonl')}", f"infer.max_batch={batch}", f"infer.max_new_tokens={max_new}",
         f"infer.ignore_eos={'false' if stops else 'true'}", "infer.progress=false", f"infer.summary={summary}", *extra])
    with open(summary) as f:
        return json.load(f)


def hf_rate(model: str, prompts: list[str], max_new: int, k: int, draft: str | None, mode: str,
            stops: bool = False) -> float:
    """transformers generate() at batch 1 over ``prompts``: tokens/s, plain, prompt lookup or assisted (``stops``:
    each stops at its end of sequence, as the engine's requests of that task do)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    target = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32).eval()
    kwargs = {}
    if mode == "ngram":
        kwargs["prompt_lookup_num_tokens"] = k
    elif mode == "draft":
        kwargs["assistant_model"] = AutoModelForCausalLM.from_pretrained(draft, torch_dtype=torch.float32).eval()
    n, t0 = 0, time.perf_counter()
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = target.generate(**ids, max_new_tokens=max_new, min_new_tokens=1 if stops else max_new,
                                  do_sample=False, pad_token_id=tok.pad_token_id or 0, **kwargs)
        n += out.shape[1] - ids["input_ids"].shape[1]
    return n / (time.perf_counter() - t0)


def step_cost(model: str, batches: list[int], k: int, context: int = 256, reps: int = 5) -> dict[int, float]:
    """Seconds of one decode step of b and of b x (1 + k) rows for each batch b, on the engine's stage worker with
    the weights laid out as ``framework.generate`` lays them out at ``infer.max_batch`` b (cpu_linear.py): r rows
    over min(r, b) slots, each at ~``context`` positions, the fastest of ``reps`` (StageWorker.time_rows, which the
    cost policy's own measurement at load uses)."""
    import torch

    from framework.infer.cache import KVCache
    from framework.infer.loader import load_stage, read_model_args
    from framework.infer.plan import plan_stages
    from framework.infer.worker import StageWorker

    args = read_model_args(model)
    stage = plan_stages(args, 1, None, 4)[0]
    out = {}
    for b in batches:
        rows = [b, b * (1 + k)]
        weights = load_stage(model, args, stage, torch.device("cpu"), torch.float32, rows_hint=b)
        cache = KVCache(stage.layers, b, args.kv_heads, context + max(rows) + 1, args.head_dim, torch.float32,
                        torch.device("cpu"))
        worker = StageWorker(weights, cache, torch.device("cpu"), torch.float32, max_rows=max(rows))
        out.update(zip(rows, worker.time_rows(rows, context, reps)))
    return out


# (proposer, prompts, target): the target is a key of the models
CASES = [("ngram", "copy", "copy"), ("ngram", "code-edit", "code"), ("draft", "code", "code")]
CASES_MODEL = {task: model for _, task, model in CASES}


def bench_case(proposer: str, task: str, models: dict, prompts: list[str], a, work: str) -> list[dict]:
    """Every batch of one case, ``a.repeats`` interleaved rounds of (plain, speculative, speculative forced on)."""
    spec = [f"infer.speculative={proposer}", f"infer.num_speculative_tokens={a.k}"]
    if proposer == "draft":
        spec.append(f"infer.draft_model_dir={models['draft']}")
    model = models[CASES_MODEL[task]]
    rows = []
    for batch in a.batches:
        rounds = []
        for i in range(a.repeats):
            # the order alternates between rounds, so that whatever a run leaves behind (caches, the last run's
            # load) falls on the baseline and on speculation alike
            runs = [("plain", []), ("spec", spec), ("forced", spec + ["infer.speculative_max_batch=100000",
                                                                        "infer.speculative_policy=acceptance"])]
            got = {name: engine_rate(model, prompts, batch, a.max_new, extra, work, STOPS.get(task, 0))
                   for name, extra in (runs if i % 2 == 0 else runs[::-1])}
            rounds.append({"plain": got["plain"]["tokens_per_s"], "spec": got["spec"]["tokens_per_s"],
                           "forced": got["forced"]["tokens_per_s"], "acceptance": got["forced"]["acceptance_rate"],
                           "mean_len": got["forced"]["mean_accepted_length"]})
        med = {k: statistics.median(r[k] for r in rounds if r[k] is not None) if any(r[k] is not None for r in rounds)
               else None for k in rounds[0]}
        rows.append({"proposer": proposer, "task": task, "batch": batch, **med, "rounds": rounds})
    return rows



def hf_columns(rows: list[dict], models: dict, prompts_of: dict, a) -> None:
    """transformers at batch 1 beside each case's batch-1 row."""
    for r in rows:
        if r["batch"] != 1:
            continue
        model, prompts = models[CASES_MODEL[r["task"]]], prompts_of[r["task"]][: a.hf_prompts]
        plain, assisted, stops = [], [], r["task"] in STOPS
        for _ in range(a.repeats):
            plain.append(hf_rate(model, prompts, a.max_new, a.k, None, "plain", stops))
            assisted.append(hf_rate(model, prompts, a.max_new, a.k, models["draft"], r["proposer"], stops))
        r["hf_plain"], r["hf_spec"] = statistics.median(plain), statistics.median(assisted)


def fmt(x, spec="{:.1f}") -> str:
    return "-" if x is None else spec.format(x)


def print_table(rows: list[dict], cost: dict[int, float], k: int) -> None:
    print("| proposer | task | batch | plain tok/s | spec tok/s | speedup | forced on tok/s | forced speedup | "
          "acceptance | mean accepted len | HF plain tok/s | HF assisted tok/s | HF speedup |")
    print("|" + "---|" * 13)
    for r in rows:
        hf = r.get("hf_plain"), r.get("hf_spec")
        print(f"| {r['proposer']} | {r['task']} | {r['batch']} | {fmt(r['plain'])} | {fmt(r['spec'])} | "
              f"{fmt(r['spec'] / r['plain'], '{:.2f}x')} | {fmt(r['forced'])} | {fmt(r['forced'] / r['plain'], '{:.2f}x')} | "
              f"{fmt(r['acceptance'], '{:.2f}')} | {fmt(r['mean_len'], '{:.2f}')} | {fmt(hf[0])} | {fmt(hf[1])} | "
              f"{fmt(hf[1] / hf[0] if hf[0] and hf[1] else None, '{:.2f}x')} |")
    print(f"\ndecode step cost against rows (code target, CPU eager): verifying k={k} drafts a row multiplies a step's "
          "rows by (1 + k); it pays while that ratio stays below the mean accepted length")
    print("(at each batch r the weights laid out as the engine lays them out for it; a step of r x (1+k) rows is r "
          "slots of 1+k rows each)")
    print("| rows r | step ms | ms a row | step(r x (1+k)) / step(r) |")
    print("|---|---|---|---|")
    for r, t in cost.items():
        big = cost.get(r * (1 + k))
        print(f"| {r} | {t * 1e3:.2f} | {t * 1e3 / r:.3f} | {fmt(big / t if big else None, '{:.2f}')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copy-target", help="export (or run dir) of a model trained on the synthetic copy task")
    ap.add_argument("--code-target", help="export (or run dir) of a model trained on stdlib (experiment=stdlib_30m)")
    ap.add_argument("--draft", help="the distilled draft of --code-target (experiment=distill_stdlib)")
    ap.add_argument("--cases", default=",".join(f"{p}/{t}" for p, t, _ in CASES),
                    help="which of the cases (proposer/task), comma-separated")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-prompts", type=int, default=8, help="prompts of the transformers batch-1 baselines")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    ap.add_argument("--tiny", action="store_true", help="tiny models, batches 1 and 4, 16 tokens, one round")
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "bench_spec.json"))
    a = ap.parse_args()
    if a.tiny:
        a.batches, a.max_new, a.repeats, a.hf_prompts = "1,4", 16, 1, 2
    a.batches = [int(b) for b in a.batches.split(",")]
    cases = a.cases.split(",")
    unknown = sorted(set(cases) - {f"{p}/{t}" for p, t, _ in CASES})
    if unknown:
        raise SystemExit(f"--cases {','.join(unknown)}: use some of {', '.join(f'{p}/{t}' for p, t, _ in CASES)}")
    work = tempfile.mkdtemp(prefix="bench_spec-")
    if a.copy_target and a.code_target and a.draft:
        from framework.checkpoint.resolve import resolve_model_dir

        models = {"copy": resolve_model_dir(a.copy_target)[0], "code": resolve_model_dir(a.code_target)[0],
                  "draft": resolve_model_dir(a.draft)[0]}
    else:
        print("[bench_spec] training the copy-task target, the stdlib target and its distilled draft", file=sys.stderr)
        models = train_models(work, a.tiny)
    # the same prompts whatever batches are asked for (a batch-1 case runs the first MIN_REQUESTS of them)
    n = max(*a.batches, 64)
    prompts_of = {"copy": copy_prompts(n), "code-edit": edit_prompts(64), "code": code_prompts(64)}
    rows = []
    for proposer, task, _ in CASES:
        if f"{proposer}/{task}" not in cases:
            continue
        rows += bench_case(proposer, task, models, prompts_of[task], a, work)
    if not a.no_hf:
        hf_columns(rows, models, prompts_of, a)
    cost = step_cost(models["code"], a.batches, a.k)
    print_table(rows, cost, a.k)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"models": models, "k": a.k, "max_new": a.max_new, "rows": rows,
                   "step_cost_s": {str(r): t for r, t in cost.items()}}, f, indent=1)
    print(f"\n[bench_spec] rounds and medians: {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
