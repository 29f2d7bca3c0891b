"""Checkpoints under failure: exact resume after kill -9 (torchrun restarts the job), a kill mid-save, resume on
another (dp, tp, ZeRO) layout, and the integrity checks that refuse a damaged or foreign checkpoint."""

import hashlib
import json
import os
import shutil
import subprocess

import pytest
import torch

from tests.helpers import (
    RESUME_BASE,
    RESUME_STEPS,
    TINY_TRAIN,
    TORCHRUN,
    assert_ok,
    env,
    error_lines,
    export_weights,
    losses,
    run_module,
)

pytestmark = pytest.mark.distributed

STEPS, BASE, weights = RESUME_STEPS, RESUME_BASE, export_weights


def train_with_fault(run_dir, fault: str) -> subprocess.CompletedProcess:
    """torchrun --max-restarts=1 with one rank SIGKILLed at ``fault`` on the first attempt."""
    e = env()
    e["MIAOTUI_FAULT"] = fault
    cmd = [TORCHRUN, "--nproc_per_node=2", "--standalone", "--max-restarts=1", "-m", "framework.train", *BASE,
           f"run_dir={run_dir}"]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("whole")
    assert_ok(run_module("framework.train", [*BASE, f"run_dir={run}"], nproc=2))
    return run


def test_kill9_one_rank_resumes_bitwise(uninterrupted, tmp_path):
    proc = train_with_fault(tmp_path, "step:6:1")
    assert_ok(proc)
    assert "[fault] SIGKILL rank 1 at step 6" in proc.stderr
    assert f"resumed from {tmp_path}/checkpoints/step-000004 at step 4" in proc.stderr
    # the same loss at every step (the resumed attempt's values are logged last) and the same final weights
    assert losses(tmp_path) == losses(uninterrupted)
    a, b = weights(tmp_path), weights(uninterrupted)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_mid_save_resumes_from_previous_checkpoint(uninterrupted, tmp_path):
    # rank 0 dies after the shards of step 8 are written, before its manifest and `latest`
    proc = train_with_fault(tmp_path, "save:8:0")
    assert_ok(proc)
    assert "[fault] SIGKILL rank 0 at save 8" in proc.stderr
    assert f"resumed from {tmp_path}/checkpoints/step-000004 at step 4" in proc.stderr
    a, b = weights(tmp_path), weights(uninterrupted)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the rewritten step-8 checkpoint is complete
    assert (tmp_path / "checkpoints" / "step-000008" / "manifest.json").is_file()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref")
    assert_ok(run_module("framework.train", [*TINY_TRAIN, "trainer.max_steps=12", f"run_dir={run}"]))
    return losses(run)


def run_segments(run_dir, segments):
    """Train one run in segments, each at its own layout, resuming from the previous segment's checkpoint."""
    base = [a for a in TINY_TRAIN if not a.startswith("checkpoint.resume")] + ["trainer.max_steps=12"]
    got = {}
    for nproc, overrides, stop in segments:
        proc = run_module("framework.train", [*base, f"run_dir={run_dir}", f"trainer.stop_at={stop}", *overrides],
                          nproc=nproc)
        assert_ok(proc)
        if got:
            assert "per-parameter state" in proc.stderr, proc.stderr[-2000:]
        got.update(losses(run_dir))
    return got


@pytest.mark.parametrize("segments", [
    [(2, ["parallel.tp=2"], 6), (2, ["parallel.tp=1", "parallel.zero_stage=3"], 12)],
    [(2, ["parallel.zero_stage=1"], 4), (2, ["parallel.tp=2", "parallel.zero_stage=2"], 8),
     (4, ["parallel.tp=2", "parallel.zero_stage=3"], 12)],
], ids=["dp1tp2-dp2z3", "dp2z1-tp2z2-dp2tp2z3"])
def test_resume_on_another_layout(reference, tmp_path, segments):
    got = run_segments(tmp_path, segments)
    assert sorted(got) == sorted(reference)
    for step, ref in reference.items():
        assert abs(got[step] - ref) <= 1e-4 * abs(ref), (step, got[step], ref)


def tree_digest(path) -> dict[str, str]:
    return {os.path.relpath(os.path.join(r, f), path): hashlib.sha256(open(os.path.join(r, f), "rb").read()).hexdigest()
            for r, _, files in os.walk(path) for f in files}


@pytest.mark.parametrize("damage,expected", [
    ("corrupt", "does not match its sha256"),
    ("truncate", "the file is truncated or altered"),
    ("missing", "missing file"),
    ("other_model", "is of another model (dim"),
])
def test_damaged_or_foreign_checkpoint_is_refused(uninterrupted, tmp_path, damage, expected):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    step = run / "checkpoints" / "step-000010"
    shard = next((step / "universal").glob("state-*.safetensors"))
    overrides = [f"checkpoint.resume={step}"]  # named explicitly: refused (`latest` falls back to an older one instead)
    if damage == "corrupt":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "missing":
        shard.unlink()
    else:
        overrides.append("model.dim=32")
    before = tree_digest(run)
    proc = run_module("framework.train", [*BASE, f"run_dir={run}", "trainer.max_steps=12", *overrides])
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-3000:]
    if damage != "other_model":
        assert shard.name in lines[0]
    # nothing touched: config.yaml, data/, the tokenizer, the checkpoints, latest and the export are as they were
    assert tree_digest(run) == before
    assert json.loads((run / "summary.json").read_text())["step"] == STEPS


def test_fp16_zero0_checkpoint_refuses_a_layout_change(uninterrupted, tmp_path):
    """fp16 at ZeRO 0 keeps its fp32 masters and moments where the per-parameter state cannot see them: a layout
    change is refused in one line, before anything is written. (fp16 needs CUDA: the state is relabelled here.)"""
    from framework.checkpoint.manifest import hash_files, write_manifest

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    step = run / "checkpoints" / "step-000010"
    state = json.loads((step / "trainer_state.json").read_text())
    state.update(precision="fp16", layout={**state["layout"], "zero_stage": 0})
    (step / "trainer_state.json").write_text(json.dumps(state))
    manifest = json.loads((step / "manifest.json").read_text())
    files = {**manifest["files"], **hash_files(str(step), ["trainer_state.json"])}
    write_manifest(str(step), {"step": manifest["step"]}, files)
    before = tree_digest(run)
    proc = run_module("framework.train", [*BASE, f"run_dir={run}", "trainer.max_steps=12", "parallel.zero_stage=1"])
    lines = error_lines(proc)
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert "saved with fp16 at ZeRO 0" in lines[0] and "parallel.zero_stage=0" in lines[0]
    assert tree_digest(run) == before
