"""Checkpoint benchmark: save, load and export seconds for one model at dp=2, on the real entry points.

1. train 2 steps at dp=2 (ZeRO 1), save (DeepSpeed shards + per-parameter state) and export at the end;
2. resume at the same layout (DeepSpeed shards) for one more step;
3. resume at dp=1 x tp=2 (per-parameter state) for one more step;
4. ``python -m framework.export`` of the checkpoint in one process, without DeepSpeed.

Each row also gives the checkpoint's size and the rate. The times come from the trainer's own summary.json.

    python scripts/bench_checkpoint.py                  # the 125m flavor on CPU
    python scripts/bench_checkpoint.py --model small    # quick
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


def dir_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 2**20


def run(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": REPO,
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="125m")
    p.add_argument("--out", default=None, help="write the results as JSON here too")
    a = p.parse_args()
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    with tempfile.TemporaryDirectory() as tmp:
        rd = os.path.join(tmp, "run")
        base = [f"model={a.model}", "trainer.seq_len=64", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
                "trainer.eval_every=0", "trainer.max_steps=4", "logger.progress=false", "trainer.warmup_steps=1",
                "data.synthetic.num_examples=2000", f"run_dir={rd}"]

        def train(nproc: int, extra: list[str]) -> dict:
            run([torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "framework.train", *base, *extra])
            with open(os.path.join(rd, "summary.json")) as f:
                return json.load(f)

        first = train(2, ["trainer.stop_at=2", "checkpoint.export=false"])
        step_dir = os.path.join(rd, "checkpoints", "step-000002")
        ckpt_mb = dir_mb(step_dir)
        same = train(2, ["trainer.stop_at=3", "checkpoint.save_final=false", "checkpoint.export=false"])
        other = train(2, ["parallel.tp=2", "checkpoint.save_final=false"])
        out = os.path.join(tmp, "export")
        export_cli = run([sys.executable, "-m", "framework.export", f"checkpoint={step_dir}", f"out={out}"])
        export_mb = dir_mb(out)
    rows = [
        ("save (dp=2: DeepSpeed shards + per-parameter state)", first["save_s"], ckpt_mb),
        ("load, same layout (DeepSpeed shards)", same["load_s"], ckpt_mb),
        ("load, dp=2 -> dp=1 x tp=2 (per-parameter state)", other["load_s"], ckpt_mb),
        ("export at the end of training (dp=1 x tp=2 engine)", other["export_s"], export_mb),
        ("python -m framework.export (1 process, whole command)", export_cli, export_mb),
    ]
    print(f"\nmodel {a.model}: checkpoint {ckpt_mb:.0f} MiB, export {export_mb:.0f} MiB (fp32)\n")
    print(f"| {'operation':<56} | {'seconds':>8} | {'MiB/s':>7} |")
    print(f"|{'-' * 58}|{'-' * 10}|{'-' * 9}|")
    for name, secs, mb in rows:
        print(f"| {name:<56} | {secs:>8.2f} | {mb / secs:>7.0f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": a.model, "checkpoint_mb": ckpt_mb, "export_mb": export_mb,
                       "rows": [{"operation": n, "seconds": s} for n, s, _ in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
