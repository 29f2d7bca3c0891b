"""Slurm for real: a one-node cluster started here (munged, slurmctld, slurmd as root; Debian's packages installed
when missing), the sbatch template, a submitit sweep of two jobs, and a requeued job that resumes."""

import json
import os
import subprocess
import time

import pytest

from tests.helpers import PYTHON, REPO, TINY_TRAIN, env, losses, read_metrics

pytestmark = pytest.mark.launch

CLUSTER = os.path.join(REPO, "launch", "slurm", "local_cluster.sh")
SBATCH = os.path.join(REPO, "launch", "slurm", "train.sbatch")


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (munged, slurmctld, slurmd): run the tests as root to cover Slurm")
    proc = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"Slurm could not be installed or started here: {proc.stderr.strip().splitlines()[-1:]}")
    yield
    subprocess.run([CLUSTER, "stop"], capture_output=True, timeout=120)


def sbatch(run_dir, overrides: list[str]) -> str:
    proc = subprocess.run(["sbatch", "--parsable", SBATCH, *overrides], cwd=REPO, capture_output=True, text=True,
                          env={**env(), "RUN_DIR": str(run_dir), "NPROC": "2"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "UNKNOWN")


def wait_done(job: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job])
    pytest.fail(f"Slurm job {job} did not finish in {timeout}s (state {job_state(job)})")


def test_sbatch_training_job(cluster, tmp_path):
    run = tmp_path / "run"
    job = sbatch(run, [*[a for a in TINY_TRAIN if not a.startswith("checkpoint.")], "trainer.max_steps=8"])
    assert wait_done(job) == "COMPLETED", (run / f"slurm-{job}.log").read_text()[-3000:]
    log = (run / f"slurm-{job}.log").read_text()  # the job's log lives in its run directory
    assert "world=2 (pp=1 x dp=2 x tp=1)" in log
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000008"
    assert sorted(losses(str(run))) == list(range(1, 9))
    assert (run / "export" / "config.json").is_file()


def test_submitit_sweep_of_two_jobs(cluster, tmp_path):
    tiny = [a for a in TINY_TRAIN if not a.startswith(("trainer.lr=", "checkpoint."))] + ["checkpoint.export=false"]
    proc = subprocess.run([PYTHON, "-m", "framework.train", "-m", "hydra/launcher=slurm", "trainer.lr=1e-3,3e-3",
                           "name=sl", *tiny, "trainer.max_steps=4"], cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lrs = []
    for job in ("0", "1"):
        run = tmp_path / "runs" / "sl-sweep" / job
        assert json.loads((run / "summary.json").read_text())["step"] == 4
        assert (run / "checkpoints" / "latest").is_file()
        assert list(run.glob("slurm-*.out")), "the job's log is linked into its run directory"
        lrs.append([m["lr"] for m in read_metrics(str(run)) if m["step"] == 4][0])
    assert lrs[1] == pytest.approx(3 * lrs[0])


def test_requeued_job_resumes_from_its_checkpoint(cluster, tmp_path):
    run = tmp_path / "run"
    job = sbatch(run, ["model=small", "data.synthetic.num_examples=4000", "trainer.seq_len=64",
                       "trainer.global_batch_size=32", "trainer.micro_batch_size=16", "trainer.eval_every=0",
                       "trainer.max_steps=60", "checkpoint.every=5", "logger.progress=false",
                       "checkpoint.export=false"])
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + 180
    while not latest.is_file():
        assert time.monotonic() < deadline and job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), job_state(job)
        time.sleep(0.5)
    saved = int(latest.read_text().strip().split("-")[1])
    assert saved < 60, "the job ended before it could be requeued"
    subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True)
    assert wait_done(job, timeout=400) == "COMPLETED"
    log = (run / f"slurm-{job}.log").read_text()
    assert "attempt 2" in log
    resumed = [line for line in log.splitlines() if "[miaotui] resumed from" in line]
    assert len(resumed) == 1 and "at step 0 " not in resumed[0], resumed
    assert json.loads((run / "summary.json").read_text())["step"] == 60
