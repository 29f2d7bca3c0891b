"""``python -m framework.report <run_dir | benchmark.json | lm-eval results.json>``: PNG plots beside the input.

- a run directory (its ``metrics.jsonl``): ``loss.png`` (training and validation loss against tokens seen), ``lr.png``,
  ``grad_norm.png``, ``tokens_per_s.png``, ``mfu.png``, ``eval_exact_match.png``, and ``eval_scores.png`` from any
  lm-evaluation-harness results JSON found in it; a figure whose metric the run did not log is skipped, in one line;
- a benchmark's JSON (``scripts/bench_{infer,serve,compress,train}.py``): ``<name>_<figure>.png`` beside it;
- an lm-eval results JSON: ``<name>_scores.png`` beside it.
"""

from __future__ import annotations

import json
import os

from framework.cli import UserError
from framework.report.bench import (
    PLOTTERS,
    detect_bench,
    plot_bench_compress,
    plot_bench_infer,
    plot_bench_serve,
    plot_bench_train,
)
from framework.report.common import Plots
from framework.report.training import is_eval_results, plot_eval_scores, plot_run, read_metrics

__all__ = ["Plots", "report", "plot_run", "plot_json", "plot_eval_scores", "plot_bench_infer", "plot_bench_serve",
           "plot_bench_compress", "plot_bench_train", "read_metrics", "write_bench_json"]


def plot_json(path: str) -> Plots:
    """The figures of a benchmark's JSON, or of an lm-eval results JSON, beside it."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except ValueError:
        raise UserError(f"{path} is not valid JSON: pass a run directory or the JSON a benchmark wrote") from None
    prefix = path[: -len(".json")] if path.endswith(".json") else path
    kind = detect_bench(doc)
    if kind is not None:
        return PLOTTERS[kind](doc, prefix)
    if is_eval_results(doc):
        return plot_eval_scores([path], prefix + "_scores.png")
    raise UserError(f"{path} is neither a benchmark's JSON (scripts/bench_infer.py, bench_serve.py, bench_compress.py, "
                    "bench_train.py --json) nor lm-eval results: pass one of those or a run directory")


def report(path: str) -> Plots:
    """Every figure for ``path`` (a run directory or a JSON), written beside it."""
    if os.path.basename(path) == "metrics.jsonl":
        return plot_run(os.path.dirname(path) or ".")
    if os.path.isfile(path):
        return plot_json(path)
    if not os.path.exists(path):
        raise UserError(f"no such run directory or file: {path}: pass the run_dir of a framework.train run or a "
                        "benchmark's JSON")
    return plot_run(path)


def write_bench_json(result, json_path: str) -> Plots:
    """What every benchmark script does last: its result as JSON, then its figures beside it. The figures need
    matplotlib, which a bare GPU image may lack: then they are skipped with one line, and the JSON still stands."""
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    try:
        plots = plot_json(json_path)
    except UserError as exc:
        plots = Plots(skipped=[f"figures skipped: {exc}"])
    for p in plots.written:
        print(f"[report] wrote {p}", flush=True)
    for line in plots.skipped:
        print(f"[report] {line}", flush=True)
    return plots
