"""Training benchmark: our trainer against a plain loop over the same DeepSpeed engine and model, in one run.

For dp=1 and dp=2 (one process per rank, launched with torchrun), each worker times a bare loop
(``engine(x); engine.backward(loss); engine.step()`` on fixed batches) and then our full trainer (data loader,
metrics, all-reduced loss, grad norm) on the same config, and reports tokens/s and MFU for both. The overhead
column is how much slower our trainer is.

    python scripts/bench_train.py                              # CPU: the small flavor, fp32
    python scripts/bench_train.py --model 1b --precision bf16 --seq 2048 --micro 4 --dp 1 [--ac]   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def overrides(a, run_dir: str, dp: int) -> list[str]:
    return [f"model={a.model}", f"parallel.precision={a.precision}", f"trainer.seq_len={a.seq}",
            f"trainer.micro_batch_size={a.micro}", f"trainer.global_batch_size={a.micro * dp * a.accum}",
            f"trainer.max_steps={a.steps}", f"trainer.log_every={a.steps}", "trainer.eval_every=0",
            "logger.progress=false", "checkpoint.export=false", "checkpoint.save_final=false",
            "checkpoint.resume=none", f"run_dir={run_dir}", "data.synthetic.num_examples=20000",
            f"parallel.zero_stage={a.zero}", f"parallel.activation_checkpointing={str(a.ac).lower()}",
            *(["model.vocab_size=128256"] if a.model == "1b" else [])]


def worker(a) -> None:
    import torch
    from hydra import compose, initialize_config_dir

    import framework.config  # noqa: F401  registers the schemas
    from framework.cli import CONFIG_DIR
    from framework.models.llama import build_model
    from framework.parallel.distributed import destroy, init_distributed, pick_device
    from framework.parallel.parallelize import parallelize, quiet_deepspeed
    from framework.parallel.topology import build_topology
    from framework.trainer.evaluate import lm_loss
    from framework.trainer.metrics import device_peak_tflops
    from framework.trainer.trainer import as_train_config, resolve_model_args, train

    quiet_deepspeed()
    dp = int(os.environ.get("WORLD_SIZE", "1"))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = as_train_config(compose("train", overrides=overrides(a, a.run_dir, dp)))
    device = pick_device("auto")
    rank, world = init_distributed(device)

    # Ours first creates the data and tokenizer the bare loop reuses.
    summary = train(cfg)
    ours_tps = summary["tokens_per_s"]

    from framework.data.dataset import prepare_data

    data = prepare_data(cfg.data, cfg.trainer.seq_len, cfg.seed, cfg.run_dir, rank == 0)
    args = resolve_model_args(cfg, len(data.tokenizer))
    topo = build_topology(world, rank)
    model = build_model(args, device=device, seed=0)
    engine = parallelize(model, cfg.parallel, cfg.trainer, topo, lambda s: 1.0)
    t = cfg.trainer
    batch = data.train[: t.global_batch_size // dp].to(device)
    times = []
    for step in range(a.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for micro in batch.split(t.micro_batch_size):
            loss = lm_loss(engine(micro[:, :-1]), micro[:, 1:])
            engine.backward(loss)
            engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:  # the first step warms up, as in the trainer's window
            times.append(time.perf_counter() - t0)
    plain_tps = t.global_batch_size * t.seq_len * len(times) / sum(times)
    peak = device_peak_tflops(device, cfg.parallel.precision, t.peak_tflops)
    fpt = args.flops_per_token(t.seq_len)
    if rank == 0:
        out = {"dp": dp, "ours_tps": ours_tps, "plain_tps": plain_tps,
               "ours_mfu": fpt * ours_tps / world / (peak * 1e12) if peak else None,
               "plain_mfu": fpt * plain_tps / world / (peak * 1e12) if peak else None,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
        with open(a.out, "w") as f:
            json.dump(out, f)
    destroy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--zero", type=int, default=1, help="ZeRO stage")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing")
    ap.add_argument("--json", help="also write the rows here (scripts/gpu_check.sh reads them), and their plot beside it")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--run-dir")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    rows = []
    for dp in a.dp:
        tmp = tempfile.mkdtemp(prefix="bench_train_")
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={dp}",
               os.path.abspath(__file__), "--worker", "--run-dir", os.path.join(tmp, "run"), "--out", out,
               "--model", a.model, "--precision", a.precision, "--seq", str(a.seq), "--micro", str(a.micro),
               "--accum", str(a.accum), "--steps", str(a.steps), "--zero", str(a.zero), *(["--ac"] if a.ac else [])]
        env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            sys.exit(proc.stderr[-4000:])
        with open(out) as f:
            rows.append(json.load(f))
    if a.json:  # the rows, and the plot of both loops' tokens/s and MFU beside them (framework/report/bench.py)
        from framework.report import write_bench_json

        write_bench_json([{**r, "model": a.model, "precision": a.precision, "zero": a.zero, "ac": a.ac, "seq": a.seq,
                           "micro": a.micro, "accum": a.accum} for r in rows], a.json)
    print(f"\nbench_train: model={a.model} precision={a.precision} zero={a.zero} activation_checkpointing={a.ac} "
          f"seq={a.seq} micro={a.micro} accum={a.accum} steps={a.steps} device={rows[0]['device']}")
    print("| dp | plain loop tok/s | ours tok/s | overhead | plain MFU | ours MFU |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu = lambda x: f"{x:.1%}" if x is not None else "n/a (CPU)"
        print(f"| {r['dp']} | {r['plain_tps']:.0f} | {r['ours_tps']:.0f} | {1 - r['ours_tps'] / r['plain_tps']:+.1%} | "
              f"{mfu(r['plain_mfu'])} | {mfu(r['ours_mfu'])} |")


if __name__ == "__main__":
    main()
    from framework.cli import leave

    leave()  # a worker that joined a process group exits without finalisation (see leave)
