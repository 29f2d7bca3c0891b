"""Compression benchmark: quality, agreement, size and CPU decode speed of compressed models, one table.

1. Trains the small flavor on the stdlib corpus (``experiment=stdlib_small``) and exports it.
2. Compresses it: bf16 copy, int8, int4 at group 32/64/128, magnitude 50%, Wanda 50%, Wanda 2:4
   (``framework.compress``; Wanda calibrates on 128 x 128 stdlib tokens).
3. Quality: held-out perplexity on training's own validation blocks (``framework.eval``'s code path), and greedy
   agreement with the fp32 model over 64 held-out prompts x 64 new tokens (the engine, pp=1): the share of
   identical tokens (position by position) and of identical sequences.
4. Speed: decode tokens/s at batch 1 and 8, pp=1 and pp=2, one thread a process, through ``framework.generate``'s
   engine. Every variant runs in each of ``--rounds`` interleaved rounds in the same processes; the table gives
   medians and the int rows' ratio to fp32 of the same round. The small model (1M parameters, 4 MB) sits in
   cache and its steps are Python overhead; so the same speed columns are measured on the 125m flavor's shape
   (untrained weights: speed does not depend on their values), where decode reads the weights from memory.
5. Writes the table (bench_compress.md), its figures (bench_compress.json) and the plot of held-out perplexity
   against bits per weight (bench_compress_ppl_vs_bits.png, ``framework.report``) into ``--work``.

    flock /tmp/miaotui-bench.lock .venv/bin/python scripts/bench_compress.py             # CPU, ~10-15 min
    python scripts/bench_compress.py --gpu        # on a CUDA machine, under 2 minutes: the 1B flavor's decode-step
                                                  # matrix products bf16 vs int8/int4 (CUDA graphs), 2:4 vs dense
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

SMALL_ROWS = ["fp32", "bf16", "int8", "int4-g32", "int4-g64", "int4-g128", "magnitude-50", "wanda-50", "wanda-2:4"]
BIG_ROWS = ["fp32", "bf16", "int8", "int4-g32", "int4-g64", "int4-g128"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def log(msg: str) -> None:
    print(f"[bench_compress {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- building the variants -----------------------------------------------------------------------------------
def train_small(work: str, steps: int) -> str:
    run = os.path.join(work, "small")
    export = os.path.join(run, "export")
    if not os.path.isfile(os.path.join(export, "config.json")):
        log(f"training the small flavor on stdlib ({steps} steps)")
        cmd = [sys.executable, "-m", "framework.train", "experiment=stdlib_small", f"run_dir={run}",
               f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", "logger.progress=false",
               "checkpoint.resume=none"]
        proc = subprocess.run(cmd, env={**ENV, "OMP_NUM_THREADS": "2"}, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
    return export


def bf16_copy(src: str, dst: str) -> None:
    from safetensors.torch import load_file, save_file

    if os.path.isdir(dst):
        return
    shutil.copytree(src, dst)
    for f in os.listdir(dst):
        if f.endswith(".safetensors"):
            path = os.path.join(dst, f)
            save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["torch_dtype"] = "bfloat16"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)


def make_variants(src: str, work: str, rows: list[str], tag: str) -> dict[str, str]:
    from framework.compress.run import compress
    from framework.config import CalibConfig, CompressConfig, QuantConfig

    dirs = {}
    for row in rows:
        out = os.path.join(work, f"{tag}-{row.replace(':', '_')}")
        dirs[row] = src if row == "fp32" else out
        if row == "fp32" or os.path.isdir(out):
            continue
        if row == "bf16":
            bf16_copy(src, out)
            continue
        method, _, arg = row.partition("-")
        cfg = CompressConfig(model_dir=src, out=out, method=method)
        if method == "int4":
            cfg.quant = QuantConfig(group_size=int(arg[1:]))
        elif method in ("magnitude", "wanda"):
            cfg.sparsity = "0.5" if arg == "50" else arg
            cfg.calib = CalibConfig(data="stdlib", samples=128, seq_len=128)
        compress(cfg)
    return dirs


def make_big(work: str, tokenizer_dir: str) -> str:
    """The 125m flavor's shape (vocab of the small run's tokenizer), untrained, as an export."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from framework.models.hf import to_hf_config
    from framework.models.llama import ModelArgs, build_model

    path = os.path.join(work, "big-fp32")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    yaml = OmegaConf.load(os.path.join(REPO, "configs", "model", "125m.yaml"))
    with open(os.path.join(tokenizer_dir, "config.json")) as f:
        small = json.load(f)
    args = ModelArgs(**{**OmegaConf.to_container(yaml), "vocab_size": small["vocab_size"], "max_seq_len": 512})
    model = build_model(args, seed=0)
    os.makedirs(path, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (args.tie_embeddings and k == "lm_head.weight")}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(to_hf_config(args, "float32", small.get("eos_token_id"), small.get("pad_token_id")), f, indent=1)
    for f in os.listdir(tokenizer_dir):
        if f.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy2(os.path.join(tokenizer_dir, f), path)
    return path


def dir_mb(path: str) -> float:
    from framework.compress.format import dir_size_bytes

    return dir_size_bytes(path) / 2**20


# -- quality ---------------------------------------------------------------------------------------------------
def held_out(export: str, work: str):
    from framework.config import DataConfig
    from framework.evaluation.perplexity import held_out_blocks

    # experiment=stdlib_small's data keys, seq_len and seed: training's own validation blocks
    data = DataConfig(source="stdlib", vocab_size=1024, max_chars=1_000_000)
    return held_out_blocks(data, export, 128, 0, os.path.join(work, "eval-cache"))


def perplexities(dirs: dict[str, str], blocks) -> dict[str, float]:
    import math

    from framework.evaluation.perplexity import load_for_eval, score_blocks

    out = {}
    for row, path in dirs.items():
        weights, _ = load_for_eval(path, "bf16" if row == "bf16" else "fp32")
        loss, _ = score_blocks(weights, blocks, 8)
        out[row] = math.exp(loss)
        log(f"{row}: held-out perplexity {out[row]:.3f}")
    return out


def agreement(tokens: dict[str, list[list[int]]]) -> dict[str, tuple[float, float]]:
    base = tokens["fp32"]
    out = {}
    for row, seqs in tokens.items():
        same = sum(a == b for x, y in zip(seqs, base) for a, b in zip(x, y))
        total = sum(len(y) for y in base)
        out[row] = (same / total, sum(x == y for x, y in zip(seqs, base)) / len(base))
    return out


# -- speed (the worker runs inside one process, or each rank of a torchrun) ---------------------------------------
def worker(plan_path: str) -> None:
    """Run the plan's generate jobs, interleaved over rounds, in this process (group); rank 0 writes results."""
    import torch.distributed as dist

    from framework.config import GenerateConfig, InferConfig
    from framework.infer.runner import generate
    from framework.parallel.distributed import destroy

    torch.set_num_threads(1)
    with open(plan_path) as f:
        plan = json.load(f)
    results: dict = {"speed": {}, "tokens": {}}
    pp = plan["pp"]
    for r in range(plan["rounds"]):
        for row, path in plan["dirs"].items():
            dtype = "bf16" if row == "bf16" else "fp32"
            if r == 0 and plan.get("agreement"):
                out = plan["out"] + f".{row.replace(':', '_')}.jsonl"
                inf = InferConfig(pp=pp, max_batch=64, max_new_tokens=64, ignore_eos=True, dtype=dtype, progress=False)
                generate(GenerateConfig(model_dir=path, prompts=plan["agreement"], output=out, infer=inf))
                if not dist.is_initialized() or dist.get_rank() == 0:
                    with open(out) as f:
                        results["tokens"][row] = [json.loads(line)["token_ids"] for line in f]
            for batch in (1, 8):
                out = plan["out"] + ".speed.jsonl"
                inf = InferConfig(pp=pp, max_batch=batch, max_new_tokens=plan["new_tokens"], ignore_eos=True,
                                  dtype=dtype, progress=False)
                prompts = plan["prompts_b1"] if batch == 1 else plan["prompts_b8"]
                s = generate(GenerateConfig(model_dir=path, prompts=prompts, output=out, infer=inf))
                if s:
                    results["speed"].setdefault(f"{row}|{batch}", []).append(s["decode_tokens_per_s"])
        if not dist.is_initialized() or dist.get_rank() == 0:
            log(f"pp={pp} round {r + 1}/{plan['rounds']} done")
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(plan["out"], "w") as f:
            json.dump(results, f)
    destroy()


def run_worker(plan: dict, work: str, name: str) -> dict:
    path = os.path.join(work, f"plan-{name}.json")
    plan["out"] = os.path.join(work, f"result-{name}.json")
    with open(path, "w") as f:
        json.dump(plan, f)
    if plan["pp"] == 1:
        cmd = [sys.executable, __file__, "--worker", path]
    else:
        cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
               f"--nproc_per_node={plan['pp']}", __file__, "--worker", path]
    proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker {name} failed:\n{proc.stderr[-4000:]}")
    with open(plan["out"]) as f:
        return json.load(f)


def write_prompts(path: str, texts: list[str]) -> str:
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"prompt": t}) + "\n")
    return path


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def speed_cells(speed: dict, row: str, batch: int) -> tuple[float, list[float]]:
    return med(speed.get(f"{row}|{batch}", [])), speed.get(f"{row}|{batch}", [])


def fmt_speed(speed: dict, row: str, batch: int) -> str:
    m, xs = speed_cells(speed, row, batch)
    if row == "fp32" or not xs:
        return f"{m:.0f}"
    base = speed.get(f"fp32|{batch}", [])
    ratios = [x / b for x, b in zip(xs, base)]
    return f"{m:.0f} ({med(ratios):.2f}x)"


# -- GPU mode -----------------------------------------------------------------------------------------------------
def gpu_linears(args, rows: int):
    """One decode step's matrix products at the 1B flavor's shape, as the engine runs them: per layer q|k|v,
    o, gate|up, down (fused), then the tied head (bf16 in every variant: a tied head is never quantized)."""
    hd = args.dim // args.n_heads
    shapes = [(args.n_heads * hd + 2 * args.kv_heads * hd, args.dim), (args.dim, args.n_heads * hd),
              (2 * args.ffn_dim, args.dim), (args.dim, args.ffn_dim)] * args.n_layers
    return shapes, (args.vocab_size, args.dim)


def time_graph(mods, xs, reps: int = 50) -> float:
    """Seconds a replay of a CUDA graph running every module once on its input (no launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # warm-up (lazy packing, kernel selection) outside the capture
            for m, x in zip(mods, xs):
                m(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        for m, x in zip(mods, xs):
            m(x)
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def gpu_mode(work: str, rounds: int) -> None:
    """The 1B flavor's decode-step matrix products on one GPU, bf16 against int8 and int4 (g128) weight-only at
    batch 1 (and 8), each step captured in a CUDA graph (what the engine's compiled decode runs: no launch
    overhead), so the times are the weight reads; then 2:4 semi-structured against dense. Random weights: speed
    does not depend on their values. Well under two minutes on an H100."""
    from omegaconf import OmegaConf

    from framework.compress.quantize import Int4Linear, Int8Linear
    from framework.models.llama import ModelArgs

    assert torch.cuda.is_available(), "--gpu needs a CUDA device"
    torch.manual_seed(0)
    yaml = OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "configs", "model", "1b.yaml")))
    args = ModelArgs(**{**yaml, "max_seq_len": 2048})
    shapes, head = gpu_linears(args, 1)
    with torch.device("cuda"):
        dense = [nn_linear(o, i) for o, i in shapes]
        head_mod = nn_linear(*head)
    variants = {"bf16": dense,
                "int8": [Int8Linear.from_linear(m) for m in dense],
                "int4 g128": [Int4Linear.from_linear(m, 128) for m in dense]}
    for mods in variants.values():
        for m in mods:
            if hasattr(m, "pack"):
                m.pack()
    weight_bytes = {"bf16": sum(o * i * 2 for o, i in shapes), "int8": sum(o * i + o * 4 for o, i in shapes),
                    "int4 g128": sum(o * i // 2 + o * (i // 128) * 4 for o, i in shapes)}
    head_bytes = head[0] * head[1] * 2
    lines = ["", "| 1B flavor decode step, one GPU (CUDA graph; bf16 tied head in all) | rows | ms a step | tok/s | "
             "vs bf16 | GB/s read |", "| --- | --- | --- | --- | --- | --- |"]
    try:  # first, so that the last table line (what gpu_check.sh quotes) is int4 against bf16 at batch 1
        print(gpu_sparse_table(args))
    except Exception as exc:  # noqa: BLE001 - report and keep the rest of the GPU check going
        print(f"| 2:4 semi-structured | failed: {type(exc).__name__}: {str(exc)[:200]} |")
    for rows in (8, 1):
        xs = [torch.randn(rows, i, device="cuda", dtype=torch.bfloat16) for _, i in shapes]
        xh = torch.randn(rows, head[1], device="cuda", dtype=torch.bfloat16)
        times: dict[str, list[float]] = {}
        for _ in range(max(rounds, 1)):
            for name, mods in variants.items():
                try:
                    times.setdefault(name, []).append(time_graph(mods + [head_mod], xs + [xh]))
                except Exception as exc:  # noqa: BLE001 - one failing kernel must not hide the other rows
                    print(f"| {name} | {rows} | failed: {type(exc).__name__}: {str(exc)[:160]} | | | |")
        base = med(times.get("bf16", [float("nan")]))
        for name, ts in times.items():
            t = med(ts)
            lines.append(f"| {name} | {rows} | {t * 1e3:.3f} | {rows / t:.0f} | {base / t:.2f}x | "
                         f"{(weight_bytes[name] + head_bytes) / t / 1e9:.0f} |")
    print("\n".join(lines))


def nn_linear(out_f: int, in_f: int):
    lin = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.02)
    return lin


def gpu_sparse_table(args) -> str:
    """2:4 semi-structured against dense ``F.linear`` over one 1B layer's fused linear shapes (bf16) at 1, 64 and
    2048 rows: the sparse kernels pay only once the product is compute-bound."""
    from torch.sparse import to_sparse_semi_structured

    from framework.compress.prune import Sparsity, prune_mask

    shapes, _ = gpu_linears(args, 1)
    ws = []
    for out_f, in_f in shapes[:4]:
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02
        w[prune_mask(w.abs().float(), Sparsity(0.5, (2, 4)), per_row=True)] = 0
        ws.append((w, to_sparse_semi_structured(w)))
    lines = ["", "| 2:4 vs dense, one 1B layer's linears (bf16) | rows | dense us | 2:4 us | speed-up |",
             "| --- | --- | --- | --- | --- |"]
    for rows in (1, 64, 2048):
        times = []
        for sparse in (False, True):
            xs = {w.shape[1]: torch.randn(rows, w.shape[1], device="cuda", dtype=torch.bfloat16) for w, _ in ws}

            def step(xs=xs, sparse=sparse):
                for w, s in ws:
                    torch.nn.functional.linear(xs[w.shape[1]], s if sparse else w)

            for _ in range(5):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / 50 * 1e6)
        lines.append(f"| 2:4 semi-structured | {rows} | {times[0]:.1f} | {times[1]:.1f} | {times[0] / times[1]:.2f}x |")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(REPO, "runs", "bench_compress"))
    ap.add_argument("--steps", type=int, default=400, help="training steps of the small model")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved speed rounds (3 on CPU, 1 with --gpu)")
    ap.add_argument("--no-big", action="store_true", help="skip the 125m-shape speed table")
    ap.add_argument("--gpu", action="store_true", help="the GPU figures (1B flavor) instead of the CPU table")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker)
        return
    os.makedirs(a.work, exist_ok=True)
    if a.gpu:
        gpu_mode(a.work, a.rounds or 1)
        return
    a.rounds = a.rounds or 3
    t_start = time.perf_counter()
    torch.set_num_threads(2)
    export = train_small(a.work, a.steps)
    dirs = make_variants(export, a.work, SMALL_ROWS, "small")
    log("variants ready")

    from framework.data.tokenizer import load_tokenizer

    blocks = held_out(export, a.work)
    from framework.data.store import TokenStore

    unigram = math.exp(TokenStore(os.path.join(a.work, "eval-cache", "data")).unigram_entropy())
    torch.set_num_threads(1)
    ppl = perplexities(dirs, blocks)
    tok = load_tokenizer(export)
    agree_prompts = write_prompts(os.path.join(a.work, "agree.jsonl"),
                                  [tok.decode(b[:32].tolist()) for b in blocks[:64]])
    p1 = write_prompts(os.path.join(a.work, "b1.jsonl"), [tok.decode(b[:16].tolist()) for b in blocks[:4]])
    p8 = write_prompts(os.path.join(a.work, "b8.jsonl"), [tok.decode(b[:16].tolist()) for b in blocks[:16]])
    plan = {"dirs": dirs, "rounds": a.rounds, "new_tokens": 128, "prompts_b1": p1, "prompts_b8": p8}
    small1 = run_worker({**plan, "pp": 1, "agreement": agree_prompts}, a.work, "small-pp1")
    small2 = run_worker({**plan, "pp": 2}, a.work, "small-pp2")
    agree = agreement(small1["tokens"])
    big1 = big2 = None
    if not a.no_big:
        big = make_big(a.work, export)
        bdirs = make_variants(big, a.work, BIG_ROWS, "big")
        bp1 = write_prompts(os.path.join(a.work, "bb1.jsonl"), [tok.decode(b[:16].tolist()) for b in blocks[:2]])
        bp8 = write_prompts(os.path.join(a.work, "bb8.jsonl"), [tok.decode(b[:16].tolist()) for b in blocks[:8]])
        bplan = {"dirs": bdirs, "rounds": a.rounds, "new_tokens": 32, "prompts_b1": bp1, "prompts_b8": bp8}
        big1 = run_worker({**bplan, "pp": 1}, a.work, "big-pp1")
        big2 = run_worker({**bplan, "pp": 2}, a.work, "big-pp2")

    lines = [f"Small flavor (1.05M parameters) trained {a.steps} steps on stdlib; held-out perplexity on training's "
             f"validation blocks ({blocks[:, 1:].numel()} tokens); unigram perplexity {unigram:.0f}. Decode tokens/s: "
             f"medians of {a.rounds} interleaved rounds, 1 thread a process; (x) = ratio to fp32, median of per-round "
             "ratios.", "",
             "| variant | held-out ppl | vs fp32 | same tokens | same sequences | size MiB | b1 pp1 | b8 pp1 | b1 pp2 | b8 pp2 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in SMALL_ROWS:
        t, s = agree.get(row, (float("nan"), float("nan")))
        lines.append(f"| {row} | {ppl[row]:.3f} | {100 * (ppl[row] / ppl['fp32'] - 1):+.2f}% | {100 * t:.1f}% | "
                     f"{100 * s:.1f}% | {dir_mb(dirs[row]):.2f} | {fmt_speed(small1['speed'], row, 1)} | "
                     f"{fmt_speed(small1['speed'], row, 8)} | {fmt_speed(small2['speed'], row, 1)} | "
                     f"{fmt_speed(small2['speed'], row, 8)} |")
    if big1:
        lines += ["", "Decode speed at the 125m flavor's shape (12 x 768, untrained weights; pruned exports are dense "
                  "fp32, i.e. the fp32 row):", "",
                  "| variant | size MiB | b1 pp1 | b8 pp1 | b1 pp2 | b8 pp2 |", "| --- | --- | --- | --- | --- | --- |"]
        for row in BIG_ROWS:
            lines.append(f"| {row} | {dir_mb(bdirs[row]):.1f} | {fmt_speed(big1['speed'], row, 1)} | "
                         f"{fmt_speed(big1['speed'], row, 8)} | {fmt_speed(big2['speed'], row, 1)} | "
                         f"{fmt_speed(big2['speed'], row, 8)} |")
    lines.append(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(a.work, "bench_compress.md"), "w") as f:
        f.write(table + "\n")
    from framework.report import write_bench_json
    from framework.report.bench import variant_bits

    # the JSON beside the table, and the perplexity-against-bits plot beside it (framework/report/bench.py)
    write_bench_json({"bench": "compress", "ppl": ppl, "agreement": agree, "small_pp1": small1["speed"],
                      "small_pp2": small2["speed"], "big_pp1": big1 and big1["speed"], "big_pp2": big2 and big2["speed"],
                      "unigram_ppl": unigram, "bits": {row: variant_bits(row) for row in SMALL_ROWS},
                      "size_mib": {row: dir_mb(dirs[row]) for row in SMALL_ROWS}, "steps": a.steps},
                     os.path.join(a.work, "bench_compress.json"))


if __name__ == "__main__":
    main()
    from framework.cli import leave

    leave()  # a worker that joined a process group exits without finalisation (see leave)
