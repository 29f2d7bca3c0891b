"""``trainer.distill_from``: a small model trained at dp=2 to match a frozen target's distributions (KL to its
logits, the target run forward in the same job) on the target's tokenizer; its export then drafts for the target in
speculative decoding, with a higher acceptance than the same model undistilled, and the target's exact tokens."""

import json

import pytest

from tests.helpers import TINY_TRAIN, assert_ok, error_lines, losses, run_module

pytestmark = pytest.mark.e2e

TRAIN = [a for a in TINY_TRAIN if a != "checkpoint.export=false"] + ["trainer.lr=3e-3", "trainer.warmup_steps=2"]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A debug model trained a little on the synthetic tasks: text with structure a student can learn."""
    path = tmp_path_factory.mktemp("target")
    assert_ok(run_module("framework.train", [*TRAIN, f"run_dir={path}", "trainer.max_steps=120"]))
    return path / "export"


def distill(target, run_dir, steps, nproc, *extra):
    proc = run_module("framework.train", [*TRAIN, f"run_dir={run_dir}", f"trainer.distill_from={target}",
                                          f"trainer.max_steps={steps}", *extra], nproc=nproc)
    assert_ok(proc)
    return losses(str(run_dir))


def acceptance(target, draft, tmp_path) -> float:
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["reverse: 1 2 3 =", "reverse: 9 8 7 6 =", "reverse: 4 4 1 0 2 ="]))
    out, summary = tmp_path / f"out-{draft.name}.jsonl", tmp_path / f"s-{draft.name}.json"
    proc = run_module("framework.generate", [f"model_dir={target}", f"prompts={prompts}", f"output={out}",
                                             "infer.max_new_tokens=16", "infer.ignore_eos=true",
                                             "infer.speculative=draft", f"infer.draft_model_dir={draft / 'export'}",
                                             "infer.draft_compile=false", "infer.speculative_policy=acceptance",
                                             f"infer.summary={summary}"])
    assert_ok(proc)
    return json.loads(summary.read_text())["acceptance_rate"]


def test_distilled_draft_at_dp2(target, tmp_path):
    from transformers import AutoTokenizer

    one = distill(target, tmp_path / "dp1", 1, 1, "trainer.lr=0", "model.n_layers=1")
    two = distill(target, tmp_path / "dp2", 60, 2, "model.n_layers=1")
    # each data-parallel rank runs the target on its own half of the batch: the first step's KL is the same
    assert two[1] == pytest.approx(one[1], rel=1e-4)
    assert two[60] < 0.25 * two[1]  # the student learns the target's distributions
    ours, theirs = AutoTokenizer.from_pretrained(str(tmp_path / "dp2" / "tokenizer")), AutoTokenizer.from_pretrained(
        str(target))
    assert ours.get_vocab() == theirs.get_vocab()  # trained on the target's ids: it can draft for it
    # the untrained student (lr 0: its initial weights) as a draft against the distilled one
    assert acceptance(target, tmp_path / "dp2", tmp_path) > acceptance(target, tmp_path / "dp1", tmp_path) + 0.2


def test_distill_from_nowhere_fails_in_one_line(tmp_path):
    proc = run_module("framework.train", [*TRAIN, f"run_dir={tmp_path / 'run'}",
                                          f"trainer.distill_from={tmp_path / 'missing'}"])
    lines = error_lines(proc)
    assert proc.returncode != 0 and len(lines) == 1 and "trainer.distill_from" in lines[0], proc.stderr[-3000:]
