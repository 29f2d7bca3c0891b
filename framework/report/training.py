"""A training run's figures, read from its ``metrics.jsonl``: losses against tokens seen, the learning rate, the
gradient norm, throughput, MFU and the validation scores; and lm-evaluation-harness results JSONs as bar charts."""

from __future__ import annotations

import json
import math
import os

from framework.cli import UserError
from framework.report.common import Plots, pyplot, save, style_axes

# key in a training line, file, title, y label, scale applied to the values, hint when the key is absent
TRAIN_PANELS = [
    ("lr", "lr.png", "Learning rate schedule", "learning rate", 1.0, "the run logged no lr"),
    ("grad_norm", "grad_norm.png", "Gradient norm", "global gradient L2 norm", 1.0,
     "the engine reported no gradient norm"),
    ("tokens_per_s", "tokens_per_s.png", "Training throughput", "throughput (tokens/s, all ranks)", 1.0,
     "the run logged no tokens_per_s"),
    ("mfu", "mfu.png", "Model FLOPs utilisation", "MFU (% of peak bf16 FLOP/s)", 100.0,
     "no peak FLOP/s is known for this device (as on CPU): set trainer.peak_tflops to log MFU"),
]
# validation scores other than the loss, when the run logged them
EVAL_PANELS = [("eval_exact_match", "eval_exact_match.png", "Validation exact match", "exact match (%)", 100.0,
                "the data defines no answers to match, or trainer.eval_exact_match=0")]
SKIP_DIRS = {"checkpoints", "export", "tensorboard", "wandb", "tokenizer", "data", ".hydra"}


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """The training lines (those with ``loss``) and the eval lines (those with an ``eval_*`` key) of a run, in step
    order. A resumed run appends to the same file: a line whose step is not past the last one of its kind starts
    a later attempt, which replaces what the earlier one logged from that step on."""
    if not os.path.isdir(run_dir):
        raise UserError(f"no such run directory: {run_dir}: pass the run_dir of a framework.train run, or a "
                        "benchmark's JSON")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} has no metrics.jsonl: pass the run_dir of a framework.train run (rank 0 "
                        "writes metrics.jsonl there), or a benchmark's JSON")
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    train: list[dict] = []
    evals: list[dict] = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue  # the last line of a run still writing, or of one that died mid-write
            raise UserError(f"{path} line {i + 1} is not JSON: remove that line (or the file) and run again") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            raise UserError(f"{path} line {i + 1} has no step: it is not a framework.train metrics file")
        kind = train if "loss" in row else evals if any(k.startswith("eval_") for k in row) else None
        if kind is None:
            continue
        while kind and kind[-1]["step"] >= row["step"]:
            kind.pop()
        kind.append(row)
    if not train and not evals:
        raise UserError(f"{path} has no metric lines yet: train past trainer.log_every steps, then run "
                        "framework.report again")
    return train, evals


class TokenAxis:
    """Step <-> tokens seen, from the training lines' ``tokens_seen`` (interpolated between logged steps), so that
    every figure's x axis is tokens and its top axis the step."""

    def __init__(self, points: list[tuple[float, float]]):
        self.steps = [p[0] for p in points]
        self.tokens = [p[1] for p in points]

    def __call__(self, step):
        return extrapolate(step, self.steps, self.tokens)

    def step_of(self, tokens):
        return extrapolate(tokens, self.tokens, self.steps)


def extrapolate(x, xp: list[float], fp: list[float]):
    """``np.interp``, continued past both ends along the end segments (an axis' margins lie outside the data)."""
    import numpy as np

    x = np.asarray(x, dtype=float)
    if len(xp) < 2:
        return x * (fp[0] / xp[0]) if xp[0] else np.full_like(x, fp[0])
    y = np.interp(x, xp, fp)
    lo = (fp[1] - fp[0]) / (xp[1] - xp[0])
    hi = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    y = np.where(x < xp[0], fp[0] + (x - xp[0]) * lo, y)
    return np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * hi, y)


def token_axis(train: list[dict]) -> TokenAxis | None:
    """None when the run did not log ``tokens_seen`` (its figures then use steps)."""
    points = [(r["step"], r["tokens_seen"]) for r in train if numeric(r.get("tokens_seen"))]
    if not points:
        return None
    if points[0][0] > 0 and points[0][1] > 0:
        points.insert(0, (0, 0))  # step 0 is zero tokens: evals before the first logged step still place
    return TokenAxis(points)


def numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def new_axes(tokens, title: str, ylabel: str):
    """A figure and axes whose x axis is tokens seen (engineering notation), or steps without token counts."""
    from matplotlib.ticker import EngFormatter

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    if tokens is not None:
        ax.xaxis.set_major_formatter(EngFormatter())
        top = ax.secondary_xaxis("top", functions=(tokens.step_of, tokens))
        top.set_xlabel("step", fontsize="small")
        top.tick_params(labelsize="small")
    style_axes(ax, title, "tokens seen" if tokens is not None else "step", ylabel, legend=False)
    return fig, ax


def series(rows: list[dict], key: str, tokens, scale: float = 1.0) -> tuple[list[float], list[float]]:
    kept = [r for r in rows if numeric(r.get(key))]
    xs = [float(tokens(r["step"])) if tokens is not None else r["step"] for r in kept]
    return xs, [r[key] * scale for r in kept]


def plot_losses(train: list[dict], evals: list[dict], tokens, path: str) -> Plots:
    """Training loss (every logged step) and validation loss (every eval) on one plot."""
    out = Plots()
    fig, ax = new_axes(tokens, "Training and validation loss", "cross-entropy loss (nats/token)")
    x, y = series(train, "loss", tokens)
    if x:
        ax.plot(x, y, label="training loss", color="tab:blue", linewidth=1.4)
    x, y = series(evals, "eval_loss", tokens)
    if x:
        ax.plot(x, y, label="validation loss (eval_loss)", color="tab:orange", marker="o", markersize=5, linewidth=1.6)
    else:
        out.skipped.append("validation loss not on loss.png: no eval_loss lines (set trainer.eval_every > 0)")
    ax.legend(fontsize="small")
    out.written.append(save(fig, path))
    return out


def plot_run(run_dir: str) -> Plots:
    """Every figure of a training run, written into the run directory."""
    train, evals = read_metrics(run_dir)
    tokens = token_axis(train)
    out = plot_losses(train, evals, tokens, os.path.join(run_dir, "loss.png"))
    panels = [(train, *p) for p in TRAIN_PANELS] + [(evals, *p) for p in EVAL_PANELS]
    for rows, key, name, title, ylabel, scale, hint in panels:
        x, y = series(rows, key, tokens, scale)
        if not x:
            out.skipped.append(f"{name} skipped: no '{key}' values in metrics.jsonl; {hint}")
            continue
        fig, ax = new_axes(tokens, title, ylabel)
        ax.plot(x, y, label=key, marker="o" if len(x) < 30 else None, markersize=3)
        if key == "grad_norm" and min(y) > 0 and max(y) / min(y) > 50:
            ax.set_yscale("log")  # the first steps' norms dwarf the rest
        out.written.append(save(fig, os.path.join(run_dir, name)))
    results = find_eval_results(run_dir)
    if results:
        out.extend(plot_eval_scores(results, os.path.join(run_dir, "eval_scores.png"), base=run_dir))
    else:
        out.skipped.append("eval_scores.png skipped: no lm-eval results JSON in the run directory (python -m "
                           "framework.eval model_dir=<run_dir> tasks=[...] output=<run_dir>/eval_results.json)")
    return out


# -- lm-evaluation-harness results ------------------------------------------------------------------------------
def is_eval_results(doc) -> bool:
    """lm-eval's results JSON: ``results`` maps each task to its ``metric,filter`` values."""
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, dict) or not results or not all(isinstance(v, dict) for v in results.values()):
        return False
    return "versions" in doc or "n-shot" in doc or any("," in k for v in results.values() for k in v)


def find_eval_results(run_dir: str) -> list[str]:
    """lm-eval results JSONs anywhere in the run directory, skipping checkpoints, exports and logs."""
    found = []
    for root, dirs, files in os.walk(run_dir):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".json"):
                continue
            path = os.path.join(root, name)
            try:
                with open(path) as f:
                    doc = json.load(f)
            except (OSError, ValueError):
                continue
            if is_eval_results(doc):
                found.append(path)
    return found


def eval_scores(doc: dict) -> dict[str, dict[str, tuple[float, float | None]]]:
    """metric -> task label -> (value, standard error or None), from one lm-eval results JSON."""
    scores: dict[str, dict[str, tuple[float, float | None]]] = {}
    for task, values in doc["results"].items():
        label = str(values.get("alias", task)).strip(" -") or task
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or not numeric(value):
                continue
            stderr = values.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            name = metric if filt in ("", "none") else f"{metric} ({filt})"
            scores.setdefault(name, {})[label] = (float(value), float(stderr) if numeric(stderr) else None)
    return scores


def plot_eval_scores(paths: list[str], out_path: str, base: str | None = None) -> Plots:
    """One bar chart per metric (acc, bleu, chrf, ...): a bar per task and results file, with lm-eval's standard
    error as the whisker."""
    docs = {}
    for p in paths:
        with open(p) as f:
            docs[os.path.relpath(p, base) if base else os.path.basename(p)] = eval_scores(json.load(f))
    metrics = sorted({m for d in docs.values() for m in d})
    if not metrics:
        return Plots(skipped=[f"eval_scores.png skipped: no numeric scores in {', '.join(paths)}"])
    plt = pyplot()
    heights = [len({t for d in docs.values() for t in d.get(m, {})}) for m in metrics]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 1.2 + sum(0.45 * h * len(docs) + 0.9 for h in heights)),
                             squeeze=False)
    width = 0.8 / len(docs)
    for ax, metric in zip(axes[:, 0], metrics):
        tasks = sorted({t for d in docs.values() for t in d.get(metric, {})})
        for j, (name, scores) in enumerate(docs.items()):
            cells = [scores.get(metric, {}).get(t) for t in tasks]
            ys = [i - 0.4 + width * (j + 0.5) for i in range(len(tasks))]
            vals = [c[0] if c else 0.0 for c in cells]
            errs = [c[1] or 0.0 if c else 0.0 for c in cells]
            bars = ax.barh(ys, vals, height=width * 0.9, xerr=errs, label=name, capsize=3)
            ax.bar_label(bars, labels=[f"{v:.3g}" if c else "" for v, c in zip(vals, cells)], padding=4, fontsize=8)
        ax.set_yticks(range(len(tasks)), tasks)
        ax.invert_yaxis()
        ax.margins(x=0.15)
        style_axes(ax, f"Task scores: {metric}", f"{metric} (whisker: lm-eval standard error)", "task",
                   legend=len(docs) > 1)
    return Plots(written=[save(fig, out_path)])
