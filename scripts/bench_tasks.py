"""Task scores before and after fine-tuning, and of the fine-tuned models' int8 / int4 exports.

    python scripts/bench_tasks.py [--work runs/bench_tasks] [--limit N]

1. pretrain the stdlib_small model (``experiment=stdlib_small``) unless ``--work`` has it;
2. fine-tune it twice, ``experiment=sft_sentiment`` and ``experiment=sft_translate`` (the loss on the answer only);
3. compress both fine-tuned exports to int8 and int4 (``framework.compress``);
4. score every model on the offline tasks with ``framework.eval tasks=[...]`` (lm-evaluation-harness on the engine):
   sentiment accuracy, translation BLEU / chrF / exact match (and topic accuracy of the base model, which no
   experiment fine-tunes: a control).

Prints one table (markdown) and writes ``<work>/bench_tasks.json``. Scores, not timings: nothing here needs the
machine to itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TASK_METRICS = {"miaotui_sentiment": ["acc"], "miaotui_topic": ["acc"],
                "miaotui_translate": ["bleu", "chrf", "exact_match"]}


def run(args: list[str], what: str) -> None:
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([PY, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{what} failed:\n{proc.stderr[-3000:]}")
    print(f"[bench_tasks] {what}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)


def scores(model_dir: str, tasks: list[str], out: str, limit: int | None) -> dict:
    """{task: {metric: value}} from framework.eval's results JSON (run once, kept in ``out``)."""
    if not os.path.isfile(out):
        args = ["-m", "framework.eval", f"model_dir={model_dir}", f"tasks=[{','.join(tasks)}]", f"output={out}"]
        run(args + ([f"limit={limit}"] if limit else []), f"eval {os.path.relpath(model_dir, REPO)}")
    with open(out) as f:
        results = json.load(f)["results"]
    return {t: {m: results[t].get(f"{m},none", results[t].get(f"{m},strip")) for m in TASK_METRICS[t]} for t in tasks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.join(REPO, "runs", "bench_tasks"))
    ap.add_argument("--limit", type=int, default=None, help="test rows per task (default: all 200)")
    a = ap.parse_args()
    work = os.path.abspath(a.work)
    base = os.path.join(work, "stdlib_small")
    if not os.path.isfile(os.path.join(base, "export", "config.json")):
        run(["-m", "framework.train", "experiment=stdlib_small", f"run_dir={base}", "logger.progress=false"],
            "pretrain stdlib_small")
    table = {"base": scores(base, list(TASK_METRICS), os.path.join(work, "eval_base.json"), a.limit)}
    for exp, task in (("sft_sentiment", "miaotui_sentiment"), ("sft_translate", "miaotui_translate")):
        run_dir = os.path.join(work, exp)
        if not os.path.isfile(os.path.join(run_dir, "export", "config.json")):
            run(["-m", "framework.train", f"experiment={exp}", f"run_dir={run_dir}", "logger.progress=false",
                 f"trainer.init_from={os.path.join(base, 'export')}", "checkpoint.resume=none"], f"fine-tune {exp}")
        table[exp] = scores(run_dir, [task], os.path.join(work, f"eval_{exp}.json"), a.limit)
        for method in ("int8", "int4"):
            out = os.path.join(run_dir, method)
            if not os.path.isfile(os.path.join(out, "config.json")):
                run(["-m", "framework.compress", f"model_dir={run_dir}", f"out={out}", f"method={method}"],
                    f"compress {exp} {method}")
            table[f"{exp}/{method}"] = scores(out, [task], os.path.join(work, f"eval_{exp}_{method}.json"), a.limit)
    with open(os.path.join(work, "bench_tasks.json"), "w") as f:
        json.dump(table, f, indent=1)
    print("| task | metric | base (stdlib_small) | fine-tuned | int8 | int4 |\n| --- | --- | --- | --- | --- | --- |")
    exps = {"miaotui_sentiment": "sft_sentiment", "miaotui_translate": "sft_translate", "miaotui_topic": None}
    for task, metrics in TASK_METRICS.items():
        exp = exps[task]
        for m in metrics:
            cells = [table["base"][task][m]] + ([table[k][task][m] for k in (exp, f"{exp}/int8", f"{exp}/int4")]
                                                if exp else [None] * 3)
            print(f"| {task} | {m} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |")


if __name__ == "__main__":
    main()
