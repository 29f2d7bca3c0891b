"""python -m framework.compress / framework.eval as a user runs them: results on disk, perplexity printed, and
bad input stopped with one `error:` line (every bad-input case is also checked in-process by
tests/unit/test_compress.py)."""

import json

import pytest

from tests.helpers import assert_ok, error_lines, run_module

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.helpers import make_hf_model

    path = tmp_path_factory.mktemp("hf")
    make_hf_model(str(path), n_layers=2, init_std=0.05)
    return path


@pytest.fixture(scope="module")
def int4_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "int4"
    assert_ok(run_module("framework.compress", [f"model_dir={hf_dir}", f"out={out}", "method=int4",
                                                "quant.group_size=32"]))
    return out


def test_compress_then_eval(int4_dir, tmp_path):
    res = tmp_path / "eval.json"
    proc = run_module("framework.eval", [f"model_dir={int4_dir}", "data=synthetic", "data.synthetic.num_examples=500",
                                         "seq_len=32", f"output={res}"])
    assert_ok(proc)
    r = json.loads(res.read_text())
    assert r["tokens"] > 0 and r["perplexity"] > 1 and "perplexity" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["method=int4", "quant.group_size=128"], "does not divide the 64 input features"),
    (["method=wanda", "sparsity=4:2"], "not a valid N:M"),
])
def test_bad_input_one_line(hf_dir, tmp_path, args, message):
    proc = run_module("framework.compress", [f"model_dir={hf_dir}", f"out={tmp_path / 'x'}", *args])
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_compressing_a_compressed_dir_one_line(int4_dir, tmp_path):
    proc = run_module("framework.compress", [f"model_dir={int4_dir}", f"out={tmp_path / 'again'}", "method=int8"])
    lines = error_lines(proc)
    assert proc.returncode != 0 and len(lines) == 1 and "already compressed" in lines[0]
