"""The engine: continuous batching gives every request the tokens it gets alone; the compiled decode step equals
the eager one."""

import json
import random

import pytest
import torch

from tests.helpers import assert_ok, run_module

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tests.helpers import make_hf_model

    path = str(tmp_path_factory.mktemp("hf5e"))
    hf, tok = make_hf_model(path, n_layers=5)
    return path, hf, tok


def mixed_requests(tok, n=48, seed=0):
    """Prompts of 1 to 150 tokens, max_new_tokens of 1 to 96."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        want = 1 if i == 0 else 150 if i == 1 else rng.randint(1, 150)
        words = ["reverse:", "sort:", "copy:", "="] + [str(d) for d in range(10)]
        ids = []
        while len(ids) < want:
            ids += tok(" " + rng.choice(words), add_special_tokens=False)["input_ids"]
        text = tok.decode(ids[:want])
        reqs.append({"prompt": text, "max_new_tokens": 96 if i == 2 else rng.randint(1, 96), "ignore_eos": True,
                     "seed": 1000 + i})
    lengths = [len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in reqs]
    assert min(lengths) <= 2 and max(lengths) >= 140
    return reqs


def run(path, tmp_path, reqs, pp, *extra, tp=1):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    out = tmp_path / f"out-{pp}-{abs(hash(extra))}.jsonl"
    proc = run_module("framework.generate", [f"model_dir={path}", f"prompts={src}", f"output={out}", f"infer.pp={pp}",
                                             f"infer.tp={tp}", "infer.prefill_chunk=64", "infer.progress=false", *extra],
                      nproc=pp * tp)
    assert_ok(proc)
    return [json.loads(line) for line in out.read_text().splitlines()]


def top2_gap(hf, ids: list[int]) -> float:
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, -1].double()
    top = logits.topk(2).values
    return float(top[0] - top[1])


@pytest.mark.parametrize("pp", [1, 3])
@pytest.mark.parametrize("sampling", [[], ["infer.temperature=0.8", "infer.top_p=0.9"]], ids=["greedy", "seeded"])
def test_batch_invariance(model, tmp_path, pp, sampling):
    """48 requests in one job (continuous batching, chunked prefill, rows joining and leaving) give each request
    the tokens it gets alone (infer.max_batch=1). Where fp32 rounding could flip a token, the top-2 gap of the
    reference logits at the first difference must be below 1e-5 (a near tie), else it is a bug."""
    path, hf, tok = model
    reqs = mixed_requests(tok)
    together = run(path, tmp_path, reqs, pp, *sampling)
    alone = run(path, tmp_path, reqs, pp, "infer.max_batch=1", *sampling)
    assert [len(r["token_ids"]) for r in together] == [r["max_new_tokens"] for r in reqs]
    for req, a, b in zip(reqs, together, alone):
        if a["token_ids"] == b["token_ids"]:
            continue
        assert not sampling, "a seeded row differs from its run alone"
        first = next(i for i, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"])) if x != y)
        prefix = tok(req["prompt"], add_special_tokens=False)["input_ids"] + a["token_ids"][:first]
        assert top2_gap(hf, prefix) < 1e-5, (req, first)


def test_compiled_decode_equals_eager(model, tmp_path):
    """infer.compile=true (inductor on CPU), with continuous batching of rows of different lengths and tensor
    parallelism (the all-reduce traced into the graph), gives the eager single-rank tokens."""
    path, _, tok = model
    reqs = mixed_requests(tok, n=6, seed=1)
    eager = run(path, tmp_path, reqs, 1)
    compiled = run(path, tmp_path, reqs, 1, "infer.compile=true", tp=2)
    assert [r["token_ids"] for r in compiled] == [r["token_ids"] for r in eager]


def test_compiled_batch_one_equals_eager(model, tmp_path):
    """The compiled one-row step (norm weights folded into the next matrices, a dynamic attention window, and
    inductor told to realize shared inputs) gives the eager tokens."""
    path, _, tok = model
    reqs = mixed_requests(tok, n=3, seed=3)
    eager = run(path, tmp_path, reqs, 1, "infer.max_batch=1")
    compiled = run(path, tmp_path, reqs, 1, "infer.max_batch=1", "infer.compile=true")
    assert [r["token_ids"] for r in compiled] == [r["token_ids"] for r in eager]


def test_static_baseline_gives_the_same_tokens(model, tmp_path):
    """infer.scheduler=static (the benchmark's baseline: groups that wait for their slowest row, finished rows
    still computed) answers every request as continuous batching does."""
    path, _, tok = model
    reqs = mixed_requests(tok, n=8, seed=2)
    continuous = run(path, tmp_path, reqs, 1, "infer.max_batch=3")
    static = run(path, tmp_path, reqs, 2, "infer.max_batch=3", "infer.scheduler=static")
    assert [r["token_ids"] for r in static] == [r["token_ids"] for r in continuous]


def test_process_group_ring_equals_shared_memory_ring(model, tmp_path):
    """On one CPU host the pipeline ring goes through shared memory by default; infer.transport=backend takes the
    process groups (gloo here, NCCL on GPUs, and across hosts): the same tokens, each path named in the log."""
    path, _, tok = model
    reqs = mixed_requests(tok, n=8, seed=3)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    outs = {}
    for kind, named in (("auto", "ring shared memory"), ("backend", "ring process groups")):
        out = tmp_path / f"out-{kind}.jsonl"
        proc = run_module("framework.generate", [f"model_dir={path}", f"prompts={src}", f"output={out}", "infer.pp=2",
                                                 f"infer.transport={kind}", "infer.prefill_chunk=64",
                                                 "infer.progress=false"], nproc=2)
        assert_ok(proc)
        assert named in proc.stderr
        outs[kind] = [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]
    assert outs["auto"] == outs["backend"]
