"""Masked fine-tuning loss: every (dp, tp, ZeRO) layout and every gradient-accumulation split give the
single-process loss (fp32, 1e-4), with examples of uneven lengths packed into rows and prompts masked, so that the
micro-batches and ranks count different numbers of targets (the loss is the mean over the global batch's counted
targets, not a mean of per-micro-batch means)."""

import json

import numpy as np
import pytest

from tests.helpers import assert_ok, losses, run_module

pytestmark = pytest.mark.distributed

STEPS = 8
SFT = ["model=debug", "data=files", "data.format=prompt_completion", "data.vocab_size=300", "trainer.seq_len=64",
       "trainer.global_batch_size=8", "trainer.log_every=1", "trainer.eval_every=0", "trainer.warmup_steps=2",
       "trainer.lr=3e-3", f"trainer.max_steps={STEPS}", "logger.progress=false", "checkpoint.export=false",
       "checkpoint.save_final=false", "checkpoint.resume=none"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "rows.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(600):  # answers of 1-12 words after prompts of 1-40 digits: uneven counted targets
            prompt = "n: " + " ".join(str(d) for d in rng.integers(0, 10, int(rng.integers(1, 40)))) + " ->"
            answer = " " + " ".join(rng.choice(["red", "green", "blue"], int(rng.integers(1, 12))))
            f.write(json.dumps({"prompt": prompt, "completion": answer}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def reference(rows, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref")
    assert_ok(run_module("framework.train", [*SFT, f"data.paths=[{rows}]", f"run_dir={run_dir}",
                                             "trainer.micro_batch_size=8", "parallel.zero_stage=0"]))
    ref = losses(str(run_dir))
    assert len(ref) == STEPS and ref[STEPS] < ref[1] - 0.5
    return ref


@pytest.mark.parametrize("nproc,tp,zero,micro", [(1, 1, 0, 1), (1, 1, 0, 2), (2, 1, 2, 2), (2, 2, 1, 4), (2, 1, 3, 4)])
def test_masked_loss_matches_single_process(reference, rows, tmp_path, nproc, tp, zero, micro):
    proc = run_module("framework.train", [*SFT, f"data.paths=[{rows}]", f"run_dir={tmp_path}", f"parallel.tp={tp}",
                                          f"parallel.zero_stage={zero}", f"trainer.micro_batch_size={micro}"],
                      nproc=nproc)
    assert_ok(proc)
    got = losses(str(tmp_path))
    for step, ref in reference.items():
        assert abs(got[step] - ref) <= 1e-4 * abs(ref), (step, got[step], ref)
