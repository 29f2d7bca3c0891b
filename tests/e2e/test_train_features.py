"""The training half beyond the layouts: it learns real code, every launcher shares one run directory, sweeps,
bf16 with activation checkpointing, and the TensorBoard and wandb loggers."""

import json
import os
import re
import subprocess

import pytest

from tests.helpers import PYTHON, REPO, TINY_TRAIN, assert_ok, env, losses, read_metrics, run_module

pytestmark = pytest.mark.e2e


def test_stdlib_validation_loss_far_below_unigram_entropy(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "framework.train", "experiment=stdlib_small", f"run_dir={tmp_path}",
                           "checkpoint.export=false", "checkpoint.save_final=false", "logger.progress=false"],
                          cwd=REPO, env=env(threads=2), capture_output=True, text=True, timeout=900)
    assert_ok(proc)
    summary = json.loads((tmp_path / "summary.json").read_text())
    # a unigram model of the tokens scores its entropy; the trained model is > 2 nats (7x perplexity) better
    assert summary["eval_loss"] <= summary["unigram_entropy"] - 2.0, summary


def test_deepspeed_launcher_one_run_directory(tmp_path):
    """The deepspeed launcher passes --local_rank=N, which Hydra alone rejects; every rank shares run_dir. The
    job leaves none of the 66 MiB /dev/shm segments a rank that DeepSpeed's CPU all-reduce creates under this
    launcher (it sets LOCAL_SIZE) and never removes."""
    def segments() -> set[str]:
        prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_"
        return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)} if os.path.isdir("/dev/shm") else set()

    before = segments()
    run = tmp_path / "run"
    deepspeed = os.path.join(os.path.dirname(PYTHON), "deepspeed")
    proc = subprocess.run([deepspeed, "--num_gpus", "2", os.path.join(REPO, "framework", "train.py"), *TINY_TRAIN,
                           "trainer.max_steps=6", f"run_dir={run}", "parallel.zero_stage=3"], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert_ok(proc)
    # library warnings (DeepSpeed's, torch's deprecations raised inside ZeRO 3) appear once, from rank 0, or not at all
    said = [re.sub(r"^\[[0-9-]+ [0-9:,]+\] ", "", x) for x in proc.stderr.splitlines() if "arning" in x or "WARN" in x]
    assert len(said) == len(set(said)), said
    assert "world=2 (pp=1 x dp=2 x tp=1)" in proc.stderr
    assert proc.stderr.count("[miaotui] run_dir=") == 1  # rank 0 speaks
    assert sorted(losses(str(run))) == list(range(1, 7))
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no per-rank output folders, no outputs/
    assert (run / "config.yaml").is_file()
    assert segments() <= before


def test_hydra_sweep_one_run_directory_per_job(tmp_path):
    tiny = [a for a in TINY_TRAIN if not a.startswith("trainer.lr=")]
    proc = subprocess.run([PYTHON, "-m", "framework.train", "-m", "trainer.lr=1e-3,3e-3", "name=sw", *tiny,
                           "trainer.max_steps=4"], cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert_ok(proc)
    sweep = tmp_path / "runs" / "sw-sweep"
    lrs = []
    for job in ("0", "1"):
        assert (sweep / job / "summary.json").is_file()
        lrs.append([m["lr"] for m in read_metrics(str(sweep / job)) if m["step"] == 4][0])
    assert lrs[1] == pytest.approx(3 * lrs[0])


def test_bf16_activation_checkpointing_and_loggers(tmp_path):
    from framework.models.hf import from_hf_config, read_hf_config

    tiny = [a for a in TINY_TRAIN if a != "checkpoint.export=false"]
    proc = run_module("framework.train", [*tiny, "trainer.max_steps=12", f"run_dir={tmp_path}",
                                          "parallel.precision=bf16", "parallel.activation_checkpointing=true",
                                          "logger.tensorboard=true", "logger.wandb=true", "trainer.peak_tflops=1.0"])
    assert_ok(proc)
    got = losses(str(tmp_path))
    assert got[12] < got[1] - 0.2
    last = read_metrics(str(tmp_path))[-1]
    # the utilisation is the model's FLOPs at the measured rate over the given peak (1 TFLOP/s)
    args = from_hf_config(read_hf_config(str(tmp_path / "export")))
    flops = args.flops_per_token(32) * last["tokens_per_s_per_device"]
    assert last["tflops_per_device"] == pytest.approx(flops / 1e12, rel=1e-6)
    assert last["mfu"] == pytest.approx(last["tflops_per_device"] / 1.0, rel=1e-6)
    # the resident peak of a process that imported torch and DeepSpeed: hundreds of MB, not 0 and not the machine
    assert 0.2 < last["peak_mem_gb"] < 8
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))
