"""The benchmarks' figures, drawn from the JSON each benchmark writes beside its table (``scripts/bench_*.py``).

Each ``plot_bench_*`` takes the benchmark's result and a path prefix (the JSON's path without ``.json``) and
writes ``<prefix>_<figure>.png``. Values measured over several rounds are drawn at their median, with whiskers
from the slowest to the fastest round.
"""

from __future__ import annotations

from framework.report.common import Plots, plot_cdf, pyplot, save, spread, style_axes

METRIC_LABELS = {"tokens_per_s": "tokens/s (prefill + decode)", "decode_tokens_per_s": "decode tokens/s"}


def parts_of(cases: list[dict], key: str) -> dict[str, list[dict]]:
    """The cases that carry ``key``, grouped by the benchmark part that measured them, in order of appearance."""
    out: dict[str, list[dict]] = {}
    for c in cases:
        if key in c:
            out.setdefault(c.get("part", ""), []).append(c)
    return out


def subplot_grid(n: int, width: float = 6.0, height: float = 4.2):
    plt = pyplot()
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


# -- bench_infer ----------------------------------------------------------------------------------------------
def plot_infer_batch(result: dict, path: str) -> Plots:
    """Tokens/s against batch size, one line per configuration (engine against transformers; tp=1 against tp=2)."""
    groups = parts_of(result.get("cases", []), "series")
    groups = {p: cs for p, cs in groups.items() if len({c["batch"] for c in cs}) > 1}
    if not groups:
        return Plots(skipped=[f"{path} skipped: no configuration was measured at more than one batch size"])
    fig, axes = subplot_grid(len(groups))
    titles = result.get("parts", {})
    for ax, (part, cases) in zip(axes, groups.items()):
        by_series: dict[str, list[dict]] = {}
        for c in cases:
            by_series.setdefault(c["series"], []).append(c)
        for name, cs in by_series.items():
            cs = sorted(cs, key=lambda c: c["batch"])
            stats = [spread(c["values"]) for c in cs]
            ax.errorbar([c["batch"] for c in cs], [s[0] for s in stats], yerr=[[s[1] for s in stats], [s[2] for s in stats]],
                        marker="o", capsize=3, label=name)
        batches = sorted({c["batch"] for c in cases})
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_ylim(bottom=0)
        style_axes(ax, titles.get(part, f"({part})"), "batch size (requests decoded together)",
                   METRIC_LABELS.get(cases[0].get("metric", ""), "tokens/s"))
    fig.suptitle(f"Throughput against batch size: {result.get('device', '')}", fontsize="medium")
    return Plots(written=[save(fig, path)])


def plot_infer_layouts(result: dict, path: str) -> Plots:
    """Tokens/s of each layout a part compares (pp=1 against pp=2 with 1-3 micro-batches, pp against tp, ...)."""
    groups = parts_of(result.get("cases", []), "label")
    if not groups:
        return Plots(skipped=[f"{path} skipped: no layout comparison in this result (parts b-f)"])
    fig, axes = subplot_grid(len(groups), width=6.5)
    titles = result.get("parts", {})
    for ax, (part, cases) in zip(axes, groups.items()):
        labels = list(dict.fromkeys(c["label"] for c in cases))
        metrics = list(dict.fromkeys(c.get("metric", "tokens_per_s") for c in cases))
        width = 0.8 / len(metrics)
        for j, metric in enumerate(metrics):
            cells = {c["label"]: spread(c["values"]) for c in cases if c.get("metric", "tokens_per_s") == metric}
            xs = [i - 0.4 + width * (j + 0.5) for i, lab in enumerate(labels) if lab in cells]
            stats = [cells[lab] for lab in labels if lab in cells]
            bars = ax.bar(xs, [s[0] for s in stats], width * 0.9, yerr=[[s[1] for s in stats], [s[2] for s in stats]],
                          capsize=3, label=METRIC_LABELS.get(metric, metric))
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        style_axes(ax, titles.get(part, f"({part})"), "", "tokens/s", legend=len(metrics) > 1)
    fig.suptitle(f"Throughput by layout: {result.get('device', '')}", fontsize="medium")
    return Plots(written=[save(fig, path)])


def plot_infer_latency(result: dict, path: str) -> Plots:
    """Request-latency CDFs of continuous against static batching, one panel per pipeline depth."""
    cases = [c for c in result.get("cases", []) if c.get("latencies_s")]
    if not cases:
        return Plots(skipped=[f"{path} skipped: no per-request latencies in this result (part d)"])
    depths = sorted({c.get("pp", 1) for c in cases})
    fig, axes = subplot_grid(len(depths))
    for ax, pp in zip(axes, depths):
        for c in (c for c in cases if c.get("pp", 1) == pp):
            plot_cdf(ax, c["latencies_s"], c.get("scheduler", c["label"]))
        ax.set_ylim(0, 1.02)
        style_axes(ax, f"pp={pp}: request latency, continuous vs static batching", "request latency (s)",
                   "fraction of requests done")
    return Plots(written=[save(fig, path)])


def plot_bench_infer(result: dict, prefix: str) -> Plots:
    out = plot_infer_batch(result, prefix + "_batch.png")
    out.extend(plot_infer_layouts(result, prefix + "_layouts.png"))
    return out.extend(plot_infer_latency(result, prefix + "_latency_cdf.png"))


# -- bench_serve ----------------------------------------------------------------------------------------------
def serve_rates(result: dict) -> dict[str, list[tuple[float, dict]]]:
    """server -> [(arrival rate, that rate's record)], rates ascending (JSON keys are strings)."""
    return {name: sorted(((float(r), v) for r, v in per_rate.items()), key=lambda x: x[0])
            for name, per_rate in result.get("results", {}).items()}


def plot_serve_rates(result: dict, path: str) -> Plots:
    """TTFT and TPOT (p50 solid, p99 dashed) and output tokens/s against the Poisson arrival rate, per server."""
    servers = serve_rates(result)
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    panels = [("ttft", "Time to first token (solid p50, dashed p99)", "TTFT (ms)"),
              ("tpot", "Time per output token (solid p50, dashed p99)", "TPOT (ms)")]
    for i, (name, rates) in enumerate(servers.items()):
        color = f"C{i}"
        xs = [r for r, _ in rates]
        for ax, (key, _, _) in zip(axes, panels):
            for q, style in (("p50", "-"), ("p99", "--")):
                ys = [v["summary"].get(f"{key}_{q}_s") for _, v in rates]
                ax.plot(xs, [y * 1e3 if y is not None else float("nan") for y in ys], style, marker="o", color=color,
                        label=f"{name} {q}")
        axes[2].plot(xs, [v["summary"]["output_tokens_per_s"] for _, v in rates], marker="o", color=color, label=name)
    all_rates = sorted({r for rates in servers.values() for r, _ in rates})
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ttfts = [y for line in axes[0].get_lines() for y in line.get_ydata() if y == y and y > 0]
    if ttfts and max(ttfts) > 20 * min(ttfts):  # queueing can put the top rate's p99 orders of magnitude higher
        axes[0].set_yscale("log")
        axes[0].yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes[0].yaxis.set_major_formatter(ScalarFormatter())
        axes[0].yaxis.set_minor_formatter(NullFormatter())
    else:
        axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(bottom=0)
    for i, (ax, (_, title, ylabel)) in enumerate([*zip(axes, panels), (axes[2], ("", "Output throughput", "output tokens/s"))]):
        ax.set_xscale("log")
        ax.set_xticks(all_rates, [f"{r:g}" for r in all_rates])
        ax.xaxis.set_minor_formatter(NullFormatter())
        style_axes(ax, title, "arrival rate (requests/s, Poisson)", ylabel, legend=i != 1)  # (1) repeats (0)'s legend
    return Plots(written=[save(fig, path)])


def plot_serve_latency(result: dict, path: str) -> Plots:
    """Per arrival rate, the CDF of request latency (send to last token) of every server measured."""
    servers = {n: rates for n, rates in serve_rates(result).items() if any(v.get("requests") for _, v in rates)}
    if not servers:
        return Plots(skipped=[f"{path} skipped: the JSON has no per-request timings (rerun scripts/bench_serve.py)"])
    all_rates = sorted({r for rates in servers.values() for r, _ in rates})
    fig, axes = subplot_grid(len(all_rates), width=5.5)
    for ax, rate in zip(axes, all_rates):
        for name, rates in servers.items():
            recs = next((v.get("requests") for r, v in rates if r == rate), None) or []
            lat = [q["latency_s"] for q in recs if q.get("latency_s") is not None]
            if lat:
                plot_cdf(ax, lat, name)
        ax.set_ylim(0, 1.02)
        style_axes(ax, f"{rate:g} requests/s", "request latency (s, send to last token)", "fraction of requests done")
    fig.suptitle("Request latency CDF", fontsize="medium")
    return Plots(written=[save(fig, path)])


def plot_bench_serve(result: dict, prefix: str) -> Plots:
    out = plot_serve_rates(result, prefix + "_rates.png")
    return out.extend(plot_serve_latency(result, prefix + "_latency_cdf.png"))


# -- bench_compress -------------------------------------------------------------------------------------------
def variant_bits(name: str) -> float:
    """Bits a linear weight takes in a variant's export: int4 adds an fp32 scale and an int8 zero point per group,
    int8 one fp32 scale per output row (left out: a fraction of a bit); pruned variants are stored dense in fp32."""
    if name.startswith("int4"):
        group = int(name.partition("-g")[2] or 128)
        return 4 + 40 / group
    return {"bf16": 16.0, "fp16": 16.0, "int8": 8.0}.get(name, 32.0)


def plot_bench_compress(result: dict, prefix: str) -> Plots:
    """Held-out perplexity against bits per weight, every variant labelled; fp32 as the reference line."""
    path = prefix + "_ppl_vs_bits.png"
    ppl = {k: v for k, v in result.get("ppl", {}).items() if isinstance(v, (int, float))}
    if not ppl:
        return Plots(skipped=[f"{path} skipped: no perplexities in this result"])
    bits = {k: result.get("bits", {}).get(k, variant_bits(k)) for k in ppl}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    pruned = [k for k in ppl if k.startswith(("magnitude", "wanda"))]
    quant = [k for k in ppl if k not in pruned]
    quant.sort(key=lambda k: -bits[k])
    ax.plot([bits[k] for k in quant], [ppl[k] for k in quant], "o-", label="quantized (weight-only)")
    if pruned:
        ax.plot([bits[k] for k in pruned], [ppl[k] for k in pruned], "x", markersize=9, color="tab:red",
                label="pruned (stored dense, fp32)")
    for i, k in enumerate(quant + pruned):  # neighbours' labels alternate above and below; the fewest bits' on the left
        left = k == quant[-1] and len(quant) > 1
        ax.annotate(k, (bits[k], ppl[k]), textcoords="offset points", fontsize=8, ha="right" if left else "left",
                    va="center" if left else "baseline", xytext=(-8, 0) if left else (5, 7 if i % 2 == 0 else -14))
    if "fp32" in ppl:
        ax.axhline(ppl["fp32"], color="grey", linestyle=":", label=f"fp32: {ppl['fp32']:.3f}")
    ax.set_xscale("log", base=2)
    ticks = [t for t in (2, 3, 4, 5, 6, 8, 12, 16, 24, 32) if min(bits.values()) * 0.9 <= t <= max(bits.values()) * 1.1]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.margins(x=0.12, y=0.1)
    style_axes(ax, "Held-out perplexity against weight bits", "bits per linear weight (int4: + group scale, zero point)",
               "held-out perplexity (lower is better)")
    return Plots(written=[save(fig, path)])


# -- bench_train ----------------------------------------------------------------------------------------------
def plot_bench_train(rows: list[dict], prefix: str) -> Plots:
    """Our trainer against a bare DeepSpeed loop: tokens/s per data-parallel size, and MFU where it is known."""
    path = prefix + "_throughput.png"
    with_mfu = any(r.get("ours_mfu") is not None for r in rows)
    fig, axes = subplot_grid(2 if with_mfu else 1, height=4.6)
    labels = [f"dp={r['dp']}" + (" + AC" if r.get("ac") else "") for r in rows]
    xs = range(len(rows))
    panels = [(axes[0], "tps", 1.0, "Training throughput", "tokens/s (all ranks)", "%.0f")]
    if with_mfu:
        panels.append((axes[1], "mfu", 100.0, "Model FLOPs utilisation", "MFU (% of peak)", "%.1f"))
    for ax, key, scale, title, ylabel, fmt in panels:
        for j, (who, name) in enumerate((("plain", "bare DeepSpeed loop"), ("ours", "our trainer"))):
            vals = [(r.get(f"{who}_{key}") or 0.0) * scale for r in rows]
            bars = ax.bar([x - 0.2 + 0.4 * j for x in xs], vals, 0.38, label=name)
            ax.bar_label(bars, fmt=fmt, fontsize=8, padding=2)
        ax.set_xticks(list(xs), labels)
        ax.margins(y=0.2)  # room for the legend above the bars
        style_axes(ax, title, "data-parallel ranks", ylabel)
        ax.legend(fontsize="small", loc="upper left", ncol=2)
    first = rows[0]
    fig.suptitle(f"Our trainer against a bare DeepSpeed loop: {first.get('model', '')} {first.get('precision', '')}, "
                 f"ZeRO {first.get('zero', '?')}, seq {first.get('seq', '?')}, {first.get('device', '')}", fontsize="medium")
    return Plots(written=[save(fig, path)])


def detect_bench(doc) -> str | None:
    """Which benchmark wrote ``doc``: its ``bench`` tag, else its shape (JSONs written before the tag)."""
    if isinstance(doc, list):
        return "train" if doc and all(isinstance(r, dict) and "ours_tps" in r for r in doc) else None
    if not isinstance(doc, dict):
        return None
    if doc.get("bench") in PLOTTERS:
        return doc["bench"]
    if "ppl" in doc and "agreement" in doc:
        return "compress"
    results = doc.get("results")
    if "args" in doc and isinstance(results, dict) and all(
            isinstance(v, dict) and all(isinstance(x, dict) and "summary" in x for x in v.values())
            for v in results.values()):
        return "serve"
    return None


PLOTTERS = {"infer": plot_bench_infer, "serve": plot_bench_serve, "compress": plot_bench_compress,
            "train": plot_bench_train}
