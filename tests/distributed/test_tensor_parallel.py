"""Tensor-parallel inference: tp=2 and pp=2 x tp=2 give transformers' greedy tokens (Llama GQA; Qwen2 with q/k/v
bias and tied embeddings), seeded sampling equals tp=1, each rank holds about 1/(pp x tp) of the weights, and a
bad layout is refused in one line."""

import json

import pytest
import torch

from tests.helpers import assert_ok, error_lines, run_module

pytestmark = pytest.mark.distributed

PROMPTS = ["reverse: 1 2 3 =", "reverse: 9 8 7 6 5 4 3 2 =", "copy: 5 =", "sort: 3 1 2 9 9 0 ="]
MAX_NEW = 12


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return make(tmp_path_factory, "qwen2-tied")


def make(tmp_path_factory, kind):
    from tests.helpers import make_hf_model

    path = str(tmp_path_factory.mktemp(kind))
    qwen = kind.startswith("qwen2")
    make_hf_model(path, n_layers=4, qwen=qwen, tie=qwen)
    from transformers import AutoModelForCausalLM

    from framework.data.tokenizer import load_tokenizer

    # the reference is what the directory holds, read back as the engine reads it
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(path)


def run(path, tmp_path, pp, tp, *extra):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out, summary = tmp_path / f"out-{pp}-{tp}-{len(extra)}.jsonl", tmp_path / f"s-{pp}-{tp}-{len(extra)}.json"
    proc = run_module("framework.generate", [f"model_dir={path}", f"prompts={src}", f"output={out}", f"infer.pp={pp}",
                                             f"infer.tp={tp}", f"infer.max_new_tokens={MAX_NEW}",
                                             f"infer.summary={summary}", *extra], nproc=pp * tp)
    assert_ok(proc)
    return [json.loads(line)["token_ids"] for line in out.read_text().splitlines()], json.loads(summary.read_text())


def hf_greedy(hf, tok, prompt):
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("pp,tp", [(1, 2), (2, 2)])
def test_greedy_matches_transformers_and_weights_split(request, kind, tmp_path, pp, tp):
    path, hf, tok = request.getfixturevalue(kind)
    got, summary = run(path, tmp_path, pp, tp)
    for prompt, ids in zip(PROMPTS, got):
        want = hf_greedy(hf, tok, prompt)
        assert ids == want[: len(ids)] and len(ids) == len(want), (prompt, ids, want)
    # each rank holds its 1/(pp x tp) of the weights (printed at load): nothing is replicated but the norms
    ranks = [m["weights_mb"] for m in summary["stage_memory"]]
    assert len(ranks) == pp * tp
    assert sum(ranks) <= 1.02 * summary["model_mb"]
    assert max(ranks) <= 1.25 * summary["model_mb"] / (pp * tp)


def test_seeded_sampling_equals_tp1(llama, tmp_path):
    path, _, _ = llama
    extra = ("infer.temperature=1.0", "infer.top_k=40", "infer.top_p=0.9", "infer.seed=3")
    one, _ = run(path, tmp_path, 1, 1, *extra)
    two, _ = run(path, tmp_path, 1, 2, *extra)
    assert one == two


@pytest.mark.parametrize("args,nproc,needle", [
    (["infer.tp=4"], 4, "infer.tp=4 does not divide the 2 key-value heads"),
    (["infer.tp=2", "infer.pp=2"], 2, "infer.pp=2 x infer.tp=2 = 4 processes, but 2 were launched"),
])
def test_bad_layout_one_line(llama, args, nproc, needle):
    path, _, _ = llama
    proc = run_module("framework.generate", [f"model_dir={path}", "prompt=hi", *args], nproc=nproc)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "[miaotui] loaded" not in proc.stderr
