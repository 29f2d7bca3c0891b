"""Checkpoints after a power cut and after a rollback, under real training on two ranks: a torn `latest` is skipped
for the newest checkpoint that verifies (one warning) and the run resumes from it exactly; resuming from an older
checkpoint and saving again prunes the abandoned branch, never the checkpoint rolled back to. (Each case in one
process, with the fsync order and the compressed export: tests/unit/test_checkpoint_durability.py.)"""

import json
import shutil

import pytest
import torch

from tests.helpers import RESUME_BASE, RESUME_STEPS, assert_ok, export_weights, losses, run_module

pytestmark = pytest.mark.distributed

STEPS, BASE, weights = RESUME_STEPS, RESUME_BASE, export_weights


def steps_on_disk(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("whole")
    assert_ok(run_module("framework.train", [*BASE, f"run_dir={run}"], nproc=2))
    assert steps_on_disk(run) == ["step-000004", "step-000008", "step-000010"]
    return run


def test_torn_latest_falls_back_with_one_warning_and_resumes_exactly(uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    shard = next((run / "checkpoints" / "step-000010" / "universal").glob("state-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # the power went while it was written
    shutil.rmtree(run / "export")

    proc = run_module("framework.train", [*BASE, f"run_dir={run}"], nproc=2)
    assert_ok(proc)
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line and "checkpoint" in line]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert "step-000010" in warnings[0] and shard.name in warnings[0] and "truncated" in warnings[0]
    assert "resuming from step-000008" in warnings[0]
    assert f"resumed from {run}/checkpoints/step-000008 at step 8" in proc.stderr
    # the resumed steps train exactly as the uninterrupted run did, to the same final weights
    assert losses(run) == losses(uninterrupted)
    a, b = weights(run), weights(uninterrupted)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # step 10 saved again supersedes the torn one, whose parent is the checkpoint resumed from
    assert steps_on_disk(run) == ["step-000004", "step-000008", "step-000010-r1"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000010-r1"
    state = json.loads((run / "checkpoints" / "step-000010-r1" / "trainer_state.json").read_text())
    assert state["parent"] == "step-000008"


def test_pruning_after_a_rollback_deletes_the_abandoned_branch(uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    back_to = run / "checkpoints" / "step-000004"
    proc = run_module("framework.train", [*BASE, f"run_dir={run}", f"checkpoint.resume={back_to}",
                                          "checkpoint.every=2", "trainer.stop_at=8"], nproc=2)
    assert_ok(proc)
    assert f"resumed from {back_to} at step 4" in proc.stderr
    # saves at 6 and 8 with keep=3: by step number step 4 would have gone; the abandoned 10 goes, and the new 8
    # supersedes the abandoned 8
    assert steps_on_disk(run) == ["step-000004", "step-000006", "step-000008-r1"]
    parents = {t: json.loads((run / "checkpoints" / t / "trainer_state.json").read_text())["parent"]
               for t in ("step-000006", "step-000008-r1")}
    assert parents == {"step-000006": "step-000004", "step-000008-r1": "step-000006"}
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000008-r1"
    got, ref = losses(run), losses(uninterrupted)
    assert all(got[s] == ref[s] for s in range(5, 9))  # the rolled-back run retrains steps 5-8 exactly
