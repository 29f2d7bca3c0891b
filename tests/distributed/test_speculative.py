"""Speculative decoding end to end (framework.generate): with either proposer, at pp=1, pp=2 and tp=2, greedy tokens
are exactly plain greedy's and seeded sampled tokens exactly plain sampling's; the summary reports acceptance."""

import json
import time

import pytest

from tests.helpers import assert_ok, error_lines, run_module

pytestmark = pytest.mark.distributed

PROMPTS = ["reverse: 1 2 3 =", "reverse: 9 8 7 6 5 4 3 2 =", "copy: 5 =", "sort: 3 1 2 9 9 0 =",
           "copy: 1 2 3 1 2 3 1 2 3 ="]
MAX_NEW = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 4-layer target, a 1-layer draft of other random weights (one tokenizer: train_bpe is deterministic), and a
    target whose greedy text repeats itself (tied, small weights: the input embedding dominates the head's input),
    on which prompt lookup finds long runs to keep."""
    from tests.helpers import make_hf_model

    target, draft, repeating = (str(tmp_path_factory.mktemp(n)) for n in ("target", "draft", "repeating"))
    make_hf_model(target, n_layers=4)
    make_hf_model(draft, n_layers=1, seed=1)
    make_hf_model(repeating, n_layers=4, tie=True, init_std=0.02)
    return target, draft, repeating


ACCEPTANCE = "infer.speculative_policy=acceptance"  # drafts whatever a row costs (the cost policy: test_speculative)


def run(model_dir, tmp_path, pp=1, tp=1, *extra):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    tag = f"{pp}-{tp}-{abs(hash(extra))}"
    out, summary = tmp_path / f"out-{tag}.jsonl", tmp_path / f"s-{tag}.json"
    proc = run_module("framework.generate", [f"model_dir={model_dir}", f"prompts={src}", f"output={out}",
                                             f"infer.pp={pp}", f"infer.tp={tp}", f"infer.max_new_tokens={MAX_NEW}",
                                             "infer.ignore_eos=true", f"infer.summary={summary}", *extra], nproc=pp * tp)
    assert_ok(proc)
    return [json.loads(line)["token_ids"] for line in out.read_text().splitlines()], json.loads(summary.read_text())


@pytest.fixture(scope="module")
def plain(models, tmp_path_factory):
    target, _, repeating = models
    tmp = tmp_path_factory.mktemp("plain")
    greedy, s = run(target, tmp)
    sampled, _ = run(target, tmp, 1, 1, "infer.temperature=1.0", "infer.top_p=0.9", "infer.seed=5")
    assert s["speculative"] == "none" and "acceptance_rate" not in s
    return greedy, sampled, run(repeating, tmp)[0]


# the high-acceptance proposers at every layout; the low-acceptance ones (mostly rejected drafts) at pp=1
@pytest.mark.parametrize("proposer,pp,tp", [(p, pp, tp) for p in ("ngram-repeating", "draft-self")
                                            for pp, tp in ((1, 1), (2, 1), (1, 2))]
                         + [("ngram", 1, 1), ("draft-small", 1, 1)])
def test_greedy_equals_plain_greedy(models, plain, tmp_path, pp, tp, proposer):
    target, draft, repeating = models
    ngram = ["infer.speculative=ngram", "infer.ngram_min=1", "infer.ngram_max=3"]
    # the target drafting for itself keeps every draft only while the draft's steps round as the target's do: eager
    # (the small draft runs compiled, as by default). A draft as dear as the target is worth no row to the cost
    # policy: the draft cases verify under the acceptance policy; prompt lookup under the default cost policy
    # (its step cost measured at load on stage 0's ranks, both of them at tp=2)
    self_draft = ["infer.speculative=draft", f"infer.draft_model_dir={target}", "infer.draft_compile=false",
                  ACCEPTANCE]
    model, want, extra = {"ngram": (target, plain[0], ngram), "ngram-repeating": (repeating, plain[2], ngram),
                          "draft-self": (target, plain[0], self_draft),
                          "draft-small": (target, plain[0], ["infer.speculative=draft", f"infer.draft_model_dir={draft}",
                                                             ACCEPTANCE])
                          }[proposer]
    got, s = run(model, tmp_path, pp, tp, *extra, "infer.num_speculative_tokens=4")
    assert got == want
    assert s["draft_tokens"] > 0 and 0 <= s["acceptance_rate"] <= 1
    assert s["mean_accepted_length"] == pytest.approx((s["accepted_tokens"] + s["verify_steps"]) / s["verify_steps"])
    if proposer == "draft-self":  # the target drafting for itself: every draft is kept, 5 tokens a verification
        assert s["acceptance_rate"] == 1.0 and s["mean_accepted_length"] > 4
        assert s["steps"] < MAX_NEW * s["micro_batches"]  # fewer steps a lane than tokens: the point of it
    if proposer == "ngram-repeating":  # the repeated text's continuation is found and kept
        assert s["acceptance_rate"] > 0.5 and s["steps"] < MAX_NEW * s["micro_batches"]


@pytest.mark.parametrize("pp", [1, 2])
def test_seeded_sampling_equals_plain_sampling(models, plain, tmp_path, pp):
    """The verification draws every row with the request's hashed (seed, position) noise: the kept tokens are those
    plain sampling draws, so a seeded request's text does not depend on speculation, its batch or the layout."""
    target, draft, _ = models
    sampling = ("infer.temperature=1.0", "infer.top_p=0.9", "infer.seed=5")
    for d, accept in ((target, 1.0), (draft, None)):
        got, s = run(target, tmp_path, pp, 1, *sampling, "infer.speculative=draft", f"infer.draft_model_dir={d}",
                     f"infer.draft_compile={accept is None and pp == 1}", ACCEPTANCE)
        assert got == plain[1]
        if accept is not None:  # drafted with the target's own noise: the same draws
            assert s["acceptance_rate"] == accept
    got, _ = run(target, tmp_path, pp, 1, *sampling, "infer.speculative=ngram")
    assert got == plain[1]


@pytest.mark.parametrize("pp", [1, 2])
def test_large_batch_does_not_speculate(models, plain, tmp_path, pp):
    """A lane decoding speculative_max_batch rows or more adds no drafts; at pp=2 (lanes of 3 slots) the plan and
    reply buffers are sized for the most draft rows a lane below the bound can bring, and are enough."""
    target, _, _ = models
    got, s = run(target, tmp_path, pp, 1, "infer.speculative=draft", f"infer.draft_model_dir={target}",
                 "infer.draft_compile=false", f"infer.speculative_max_batch={1 + pp}", ACCEPTANCE)
    assert got == plain[0]
    assert s["spec_skipped_steps"] > 0
    if pp == 2:  # the lane of 2 rows speculates, the lane of 3 does not
        assert s["accepted_tokens"] > 0


def test_bad_speculative_settings_fail_in_one_line(models, tmp_path):
    target, _, _ = models
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n")
    for extra, words in ((["infer.speculative=draft"], "draft_model_dir"),
                         (["infer.speculative=medusa"], "none, ngram or draft"),
                         (["infer.speculative=ngram", "infer.speculative_policy=fastest"], "cost or acceptance"),
                         (["infer.speculative=ngram", "infer.ngram_min=3", "infer.ngram_max=2"], "ngram_min"),
                         (["infer.speculative=draft", f"infer.draft_model_dir={tmp_path}/nowhere"], "not found")):
        proc = run_module("framework.generate", [f"model_dir={target}", f"prompts={src}", *extra])
        assert proc.returncode != 0
        lines = error_lines(proc)
        assert len(lines) == 1 and words in lines[0], proc.stderr[-2000:]


def test_server_reports_acceptance(models, plain, tmp_path):
    """framework.serve at pp=2 with the target drafting for itself: the completion is plain greedy's, its usage
    counts the kept and rejected draft tokens, and /metrics carries the acceptance rate and mean accepted length."""
    from tests.e2e.serve_support import ServerProcess, get, metric, post

    target, _, _ = models
    server = ServerProcess(target, str(tmp_path / "serve.log"), pp=2,
                           extra=["infer.speculative=draft", f"infer.draft_model_dir={target}",
                                  "infer.draft_compile=false", ACCEPTANCE]).wait_ready()
    try:
        status, body, _ = post(server.url + "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": MAX_NEW,
                                                                "temperature": 0, "ignore_eos": True})
        assert status == 200, body
        from framework.data.tokenizer import load_tokenizer

        assert body["choices"][0]["text"] == load_tokenizer(target).decode(plain[0][1], skip_special_tokens=True)
        details = body["usage"]["completion_tokens_details"]
        assert details["accepted_prediction_tokens"] > 0 and details["rejected_prediction_tokens"] == 0
        # the engine's counters reach the front end's /metrics after the reply may have: poll for the last step's
        deadline = time.monotonic() + 10
        while True:
            _, text = get(server.url + "/metrics")
            if (metric(text, "miaotui_spec_accepted_tokens_total") == details["accepted_prediction_tokens"]
                    or time.monotonic() > deadline):
                break
            time.sleep(0.1)
        assert metric(text, "miaotui_spec_accepted_tokens_total") == details["accepted_prediction_tokens"]
        assert metric(text, "miaotui_spec_acceptance_rate") == 1.0
        assert metric(text, "miaotui_spec_mean_accepted_length") > 4
    finally:
        server.stop()
