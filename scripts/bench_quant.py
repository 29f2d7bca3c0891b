"""Quantized CPU decode against the memory floor: tokens/s, bytes a token and GB/s streamed of the engine's decode
step for fp32 / bf16 / int8 / int4, at batch 1 and 8, eager and compiled, with the machine's read bandwidth
measured in the same run (a large tensor sum, one thread and all threads) and the fraction of it each row reaches.

What is timed: one pipeline stage holding the whole model (pp=1, tp=1), the engine's own ``StageWorker.step`` on
decode-only steps (embedding, every layer with its KV-cache attention at a context of ~64 tokens, final norm and
head; no scheduler, no sampler), its weights laid out as ``framework.infer.loader`` lays them out (fp32: the
re-laid CPU layouts and, compiled at batch 1, the folded norms; int8/int4: quantized while loading, group 128).
Weights are random (speed does not depend on their values); the vocabulary is 4096 (a small tokenizer's, as in
bench_compress), so the head is a small part of the bytes and the table measures the layers' linears.
``int8-aten`` / ``int4-aten`` are the layers on PyTorch's own kernels (the path before framework/kernels).

Bytes a token: the tensors a step reads whole (every linear weight with its scales, the norms, the head; not the
embedding table, of which a step reads one row, nor the KV cache), divided by the batch. GB/s: those bytes a step
over the time of a step. Every configuration runs in each of ``--rounds`` interleaved rounds; the table gives
medians, so that a noisy machine moves every row alike. A second table splits each batch-1 step into the weights'
products (the profiler's self times of the product calls) and the rest (the compiled graph's own code and wrapper,
guards, attention, norms): the rest is what fewer bytes cannot shrink, so it bounds the ratio to fp32 a shape allows.

    flock /tmp/miaotui-bench.lock .venv/bin/python scripts/bench_quant.py            # both shapes, ~15-25 min
    .venv/bin/python scripts/bench_quant.py --shapes 30m --modes compiled --batches 1 --rounds 3   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

SHAPES = {  # the 30M Llama of bench_infer and the 125m flavor (configs/model/125m.yaml), with a 4096-token vocabulary
    "30m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1536),
    "125m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2560),
}
VARIANTS = ["fp32", "bf16", "int8-aten", "int8", "int4-aten", "int4"]
VOCAB, CONTEXT, GROUP = 4096, 64, 128


def log(msg: str) -> None:
    print(f"[bench_quant {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read_bandwidth(threads: int, mib: int = 512, reps: int = 7) -> float:
    """GB/s of ``tensor.sum()`` over ``mib`` MiB of fp32 (far beyond the caches), median of ``reps``, ``threads``."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t = torch.ones(mib * 2**20 // 4)
    t.sum()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        t.sum()
        times.append(time.perf_counter() - start)
    torch.set_num_threads(before)
    return t.numel() * 4 / statistics.median(times) / 1e9


def streamed_bytes(weights) -> int:
    """Bytes a decode step reads whole: what the stage holds, less an embedding table the head does not share."""
    from framework.infer.loader import weight_bytes

    total = weight_bytes(weights)
    embed = weights.embed.weight
    if getattr(weights.lm_head, "weight", None) is not embed:  # an untied head (tied ones are never re-laid)
        total -= embed.numel() * embed.element_size()
    return total


def build_weights(base, variant: str, rows: int, compiled: bool):
    """The stage's weights for one configuration, laid out by the loader's own ``lay_out_for_decode``, as the engine
    lays them out."""
    from framework.infer.loader import lay_out_for_decode
    from framework.infer.worker import StageWeights
    from framework.kernels import cpu_quant

    model = copy.deepcopy(base)
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    weights = StageWeights(model.to(dtype)).eval()
    quant = variant[:4] if variant.startswith(("int8", "int4")) else None
    # "-aten": the layers as they were before the CPU decode kernels, on PyTorch's own int8/int4 kernels
    with cpu_quant.disabled() if variant.endswith("-aten") else contextlib.nullcontext():
        lay_out_for_decode(weights, quant, GROUP, rows, dtype, torch.device("cpu"), compiled)
    return weights, dtype


def build_config(base, args, variant: str, rows: int, compiled: bool) -> dict:
    from framework.infer.cache import KVCache
    from framework.infer.worker import StageWorker

    weights, dtype = build_weights(base, variant, rows, compiled)
    cache = KVCache(list(range(args.n_layers)), rows, args.n_kv_heads, CONTEXT + 64, args.head_dim, dtype,
                    torch.device("cpu"))
    worker = StageWorker(weights, cache, torch.device("cpu"), dtype, compile_decode=compiled)
    worker.warm_up(rows)
    return {"worker": worker, "rows": rows, "bytes": streamed_bytes(weights)}


def time_steps(cfg: dict, steps: int) -> float:
    """Seconds a decode step, over ``steps`` steps at positions CONTEXT.. (after one untimed step)."""
    from framework.infer.step import StepPlan

    rows, worker = cfg["rows"], cfg["worker"]

    def step(pos: int) -> None:
        worker.step(StepPlan(dec_slots=list(range(rows)), dec_pos=[pos] * rows, tokens=[1] * rows), None)

    with torch.inference_mode():
        step(CONTEXT - 1)
        start = time.perf_counter()
        for i in range(steps):
            step(CONTEXT + i)
        return (time.perf_counter() - start) / steps


PRODUCT_OPS = ("aten::mm", "aten::addmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
               "mkldnn::_linear_pointwise")


def product_share(cfg: dict, steps: int) -> float:
    """The share of a step spent in the calls that multiply by the weights (framework/kernels' operators, aten's
    int8/int4 and fp32 products): their self times over the wall time of ``steps`` profiled steps (a share, so
    that the profiler's own overhead cancels out of it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_s = time_steps(cfg, steps)
    us = sum(e.self_cpu_time_total for e in prof.key_averages()
             if e.key.startswith("miaotui_quant::") or e.key in PRODUCT_OPS)
    return min(1.0, us / 1e6 / steps / step_s)


def breakdown(name: str, configs: dict, times: dict, products: dict, band: float) -> list[str]:
    """Where a batch-1 step's time goes (``products``: the share of each in its products): the weights' products
    against everything else (the compiled graph's own code and wrapper, dynamo's guards, attention, norms), and the
    ratio to the best fp32 step that the rest alone would leave if the products took no time."""
    fp32 = [k for k in times if k[0] == "fp32" and k[1] == 1]
    if not fp32:
        return []
    best = min(statistics.median(times[k]) for k in fp32)
    lines = [f"{name}: where a batch-1 step's time goes (products: the weights' matrix products, profiled self times; "
             "rest: everything else)", "",
             "| variant | mode | step ms | products ms | products GB/s | rest ms | x best fp32 | x best fp32 if products "
             "were free |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, share in products.items():
        variant, _, mode = key
        step = statistics.median(times[key])
        prod, rest = step * share, max(step * (1 - share), 1e-9)
        lines.append(f"| {variant} | {mode} | {step * 1e3:.2f} | {prod * 1e3:.2f} | "
                     f"{configs[key]['bytes'] / prod / 1e9:.1f} | {rest * 1e3:.2f} | {best / step:.2f}x | "
                     f"{best / rest:.1f}x |")
    return lines + [f"(read bandwidth in the same run: {band:.1f} GB/s)", ""]


def kernel_crossover(dim: int, ffn: int, rows_list: list[int], reps: int = 20) -> list[str]:
    """Microseconds a call of the gate|up matrix, CPU decode kernel against aten's, by rows (where to dispatch)."""
    import torch.nn as nn

    from framework.compress.quantize import Int4Linear, Int8Linear
    from framework.kernels import cpu_quant

    lin = nn.Linear(dim, 2 * ffn, bias=False)
    i8 = Int8Linear.from_linear(lin)
    i4 = Int4Linear.from_linear(lin, GROUP)
    i4.pack()
    with cpu_quant.disabled():
        i4_aten = Int4Linear.from_linear(lin, GROUP)
        i4_aten.pack()
    lines = ["| rows | int8 kernel us | int8 aten us | int4 kernel us | int4 aten us |", "| --- | --- | --- | --- | --- |"]
    for rows in rows_list:
        x = torch.randn(rows, dim)
        cells = []
        for mod, gemv in ((i8, 1 << 30), (i8, 0), (i4, None), (i4_aten, None)):
            if gemv is not None:
                mod.gemv_rows = gemv
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                mod(x)
                times.append(time.perf_counter() - start)
            cells.append(f"{statistics.median(times) * 1e6:.0f}")
        lines.append(f"| {rows} | " + " | ".join(cells) + " |")
    return lines


def bench_shape(name: str, a) -> list[str]:
    from framework.models.llama import ModelArgs, build_model

    args = ModelArgs(**SHAPES[name], vocab_size=VOCAB, max_seq_len=2048, tie_embeddings=name == "125m")
    base = build_model(args, seed=0)
    configs = {}
    for variant in a.variants:
        for rows in a.batches:
            for mode in a.modes:
                log(f"{name}: building {variant} batch {rows} {mode}")
                configs[(variant, rows, mode)] = build_config(base, args, variant, rows, mode == "compiled")
    times: dict = {k: [] for k in configs}
    bw: dict[int, list[float]] = {1: [], a.threads: []}
    for r in range(a.rounds):
        log(f"{name}: round {r + 1}/{a.rounds}")
        for threads in bw:
            bw[threads].append(read_bandwidth(threads))
        for key, cfg in configs.items():
            times[key].append(time_steps(cfg, a.steps))
    band = {t: statistics.median(v) for t, v in bw.items()}
    # an fp32 compiled step's products are inductor's own loops, not calls: only the others are split
    products = {k: product_share(cfg, a.steps) for k, cfg in configs.items()
                if k[1] == 1 and k[0] != "bf16" and not (k[0] == "fp32" and k[2] == "compiled")}
    return table(name, configs, times, band, a.threads) + [""] + breakdown(name, configs, times, products, band[a.threads])


def table(name: str, configs: dict, times: dict, band: dict, threads: int) -> list[str]:
    lines = [f"### {name} shape, {threads} thread(s): read bandwidth {band[1]:.1f} GB/s one thread, "
             f"{band[threads]:.1f} GB/s {threads} threads (512 MiB fp32 sum, median)", "",
             "| variant | batch | mode | tok/s | x best fp32 | MB a token | GB/s streamed | of read bandwidth |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    tok = {k: k[1] / statistics.median(v) for k, v in times.items()}
    for (variant, rows, mode), cfg in configs.items():
        best_fp32 = max((tok[k] for k in tok if k[0] == "fp32" and k[1] == rows), default=float("nan"))
        step_s = statistics.median(times[(variant, rows, mode)])
        gbs = cfg["bytes"] / step_s / 1e9
        lines.append(f"| {variant} | {rows} | {mode} | {tok[(variant, rows, mode)]:.0f} | "
                     f"{tok[(variant, rows, mode)] / best_fp32:.2f}x | {cfg['bytes'] / rows / 1e6:.1f} | {gbs:.1f} | "
                     f"{gbs / band[threads]:.0%} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for the decode steps")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=24, help="decode steps a configuration a round")
    ap.add_argument("--crossover", nargs="*", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128],
                    help="rows at which to time the kernels against aten's (none: skip)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from framework.kernels import cpu_quant

    if not cpu_quant.available():
        sys.exit("the CPU decode kernels did not build (see the warning above): nothing to measure")
    out = []
    for name in a.shapes:
        out += bench_shape(name, a) + [""]
        if a.crossover:
            out += [f"{name}: one gate|up matrix a call, {a.threads} thread(s), median of 20", ""]
            out += kernel_crossover(SHAPES[name]["dim"], SHAPES[name]["ffn_dim"], a.crossover) + [""]
        print("\n".join(out), flush=True)
        out = []


if __name__ == "__main__":
    main()
