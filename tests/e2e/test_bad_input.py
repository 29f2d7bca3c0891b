"""Bad input stops before any heavy work with one line that names the fix, printed once (rank 0 only)."""

import json

import pytest

from tests.helpers import REPO, TINY_TRAIN, error_lines, run_module

pytestmark = pytest.mark.e2e


def check_one_line(proc, *needles):
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    # no traceback from our code (torchrun adds its own report of the failed children)
    assert f'File "{REPO}/framework' not in proc.stderr
    assert "[miaotui] data:" not in proc.stderr  # nothing heavy started


@pytest.mark.parametrize("args,nproc,needles", [
    (["trainer.lrr=1"], 1, ["unknown config key 'trainer.lrr'", "valid keys", "lr"]),
    (["model.n_heads=4", "model.n_kv_heads=1", "parallel.tp=2"], 2, ["does not divide the 1 key-value heads"]),
    (["parallel.tp=3", "model.n_heads=6", "model.n_kv_heads=3", "model.dim=96"], 2, ["not divisible by tp"]),
    (["data=files", "data.paths=[/nonexistent/corpus.txt]"], 1, ["data file not found: /nonexistent/corpus.txt"]),
    (["trainer.global_batch_size=10", "trainer.micro_batch_size=4"], 1, ["global_batch_size=10", "multiple of 4"]),
    (["trainer.global_batch_size=6", "trainer.micro_batch_size=2"], 2, ["global_batch_size=6", "multiple of 4"]),
])
def test_train_bad_input(tmp_path, args, nproc, needles):
    proc = run_module("framework.train", [*TINY_TRAIN, f"run_dir={tmp_path}", *args], nproc=nproc)
    check_one_line(proc, *needles)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.helpers import make_hf_model

    path = tmp_path_factory.mktemp("hf3")
    make_hf_model(str(path), n_layers=3)
    return str(path)


def test_generate_missing_model_dir(tmp_path):
    check_one_line(run_module("framework.generate", [f"model_dir={tmp_path}/nope", "prompt=hi"]),
                   "model directory not found")


def test_generate_pp_larger_than_layers(hf_dir):
    check_one_line(run_module("framework.generate", [f"model_dir={hf_dir}", "prompt=hi", "infer.pp=4"], nproc=4),
                   "more than the model's 3 layers")


def test_generate_prompt_longer_than_context(hf_dir):
    long = " ".join(["reverse: 1 2 3"] * 200)
    check_one_line(run_module("framework.generate", [f"model_dir={hf_dir}", f"prompt='{long}'"]),
                   "exceeds the model's context of 256")


def test_generate_malformed_jsonl_line_others_answered(hf_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "copy: 1 2 ="}) + "\n{broken\n" + json.dumps({"text": "no prompt"}) + "\n"
                   + json.dumps({"prompt": "copy: 3 ="}) + "\n")
    out = tmp_path / "out.jsonl"
    proc = run_module("framework.generate", [f"model_dir={hf_dir}", f"prompts={src}", f"output={out}",
                                             "infer.max_new_tokens=4"])
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4]
    assert "malformed JSONL line 2" in rows[1]["error"] and "line 3" in rows[2]["error"]
    assert rows[0]["token_ids"] and rows[3]["token_ids"]
    assert "line 2" in proc.stderr


@pytest.mark.parametrize("args,needles", [
    (["infer.max_batch=0"], ["infer.max_batch=0", "at least one"]),
    (["infer.kv_cache_gb=0.000001"], ["KV cache budget", "raise infer.kv_cache_gb"]),
    (["infer.tp=2"], ["infer.tp=2"]),
    (["infer.transport=nccl"], ["infer.transport=nccl", "auto, shm, backend"]),
])
def test_generate_engine_bad_input(hf_dir, args, needles):
    proc = run_module("framework.generate", [f"model_dir={hf_dir}", "prompt=hi", *args])
    check_one_line(proc, *needles)
    assert "[miaotui] loaded" not in proc.stderr  # refused before any weight was read


def test_generate_request_that_can_never_fit_others_answered(hf_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "copy: 1 2 ="}) + "\n" + json.dumps({"prompt": " ".join(["copy: 1 2"] * 20)})
                   + "\n" + json.dumps({"prompt": "copy: 3 =", "max_new_tokens": 0}) + "\n"
                   + json.dumps({"prompt": "copy: 3 ="}) + "\n")
    out = tmp_path / "out.jsonl"
    proc = run_module("framework.generate", [f"model_dir={hf_dir}", f"prompts={src}", f"output={out}",
                                             "infer.max_new_tokens=8", "infer.max_seq_len=32"])
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert "exceeds infer.max_seq_len of 32" in rows[1]["error"]
    assert "max_new_tokens=0" in rows[2]["error"]
    assert len(rows[0]["token_ids"]) >= 1 and len(rows[3]["token_ids"]) >= 1
