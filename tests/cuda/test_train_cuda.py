"""Training on one GPU: bf16 learns with TF32 on and a planner-checked layout, and two ranks on one GPU are refused in
one line before NCCL fails. Skipped, saying why, without CUDA (tests/conftest.py)."""

import pytest
import torch

from tests.helpers import TINY_TRAIN, assert_ok, error_lines, losses, read_metrics, run_module

pytestmark = pytest.mark.cuda


def test_bf16_training_on_one_gpu(tmp_path):
    proc = run_module("framework.train", [*TINY_TRAIN, "trainer.max_steps=20", f"run_dir={tmp_path}",
                                          "parallel.precision=bf16", "parallel.device=cuda"])
    assert_ok(proc)
    assert "device=cuda" in proc.stderr
    got = losses(str(tmp_path))
    assert got[20] < got[1] - 0.3
    last = read_metrics(str(tmp_path))[-1]
    # the device's peak comes from the table: MFU is reported, and the allocator's peak is the model's size
    assert last["mfu"] is not None and 0 < last["mfu"] < 1
    assert 0 < last["peak_mem_gb"] < 2


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() != 1, reason="needs exactly one GPU")
def test_two_ranks_on_one_gpu_refused(tmp_path):
    proc = run_module("framework.train", [*TINY_TRAIN, f"run_dir={tmp_path}", "parallel.device=cuda"], nproc=2)
    lines = error_lines(proc)
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert "2 processes on this node but 1 GPU(s) visible" in lines[0]
