"""Every (dp, tp, ZeRO) layout against the single-process run: the same per-step loss over 20 steps (fp32)."""

import pytest

from tests.helpers import TINY_TRAIN, assert_ok, losses, run_module

pytestmark = pytest.mark.distributed

STEPS = 20


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref")
    assert_ok(run_module("framework.train", [*TINY_TRAIN, f"trainer.max_steps={STEPS}", f"run_dir={run_dir}",
                                             "parallel.zero_stage=0"]))
    ref = losses(str(run_dir))
    assert len(ref) == STEPS
    # the run trains: the loss goes down
    assert ref[STEPS] < ref[1] - 0.3
    return ref


@pytest.mark.parametrize("nproc,tp,zero", [
    (2, 1, 1), (2, 1, 2), (2, 2, 1), (2, 2, 2), (4, 2, 1), (4, 2, 2), (2, 1, 3),
])
def test_layout_matches_single_process(reference, tmp_path, nproc, tp, zero):
    proc = run_module("framework.train", [*TINY_TRAIN, f"trainer.max_steps={STEPS}", f"run_dir={tmp_path}",
                                          f"parallel.tp={tp}", f"parallel.zero_stage={zero}"], nproc=nproc)
    assert_ok(proc)
    got = losses(str(tmp_path))
    assert sorted(got) == sorted(reference)
    for step, ref in reference.items():
        assert abs(got[step] - ref) <= 1e-4 * abs(ref), (step, got[step], ref)
    # logs come from rank 0 only
    assert proc.stderr.count("[miaotui] run_dir=") == 1
