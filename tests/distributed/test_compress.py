"""Compressed exports through the engine: int8 at pp=2 gives int8's pp=1 tokens, and quantizing while loading
gives the export's tokens."""

import json

import pytest

from tests.helpers import assert_ok, run_module

pytestmark = pytest.mark.distributed

PROMPTS = ["reverse: 1 2 3 =", "reverse: 9 8 7 6 5 4 3 2 =", "copy: 5 =", "sort: 3 1 2 9 9 0 ="]


def generate(model_dir, tmp_path, pp, extra=()):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / f"out-{pp}-{len(extra)}.jsonl"
    proc = run_module("framework.generate", [f"model_dir={model_dir}", f"prompts={prompts}", f"output={out}",
                                             f"infer.pp={pp}", "infer.max_new_tokens=16", "infer.ignore_eos=true",
                                             *extra], nproc=pp)
    assert_ok(proc)
    return [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]


def test_int8_pp2_equals_pp1_and_quantize_while_loading(tmp_path):
    from tests.helpers import make_hf_model

    src = tmp_path / "hf"
    make_hf_model(str(src), n_layers=4, init_std=0.05)
    from framework.compress.run import compress
    from framework.config import CompressConfig

    out = compress(CompressConfig(model_dir=str(src), out=str(tmp_path / "int8"), method="int8"))
    pp1 = generate(out, tmp_path, 1)
    assert all(len(t) == 16 for t in pp1)
    assert generate(out, tmp_path, 2) == pp1
    assert generate(src, tmp_path, 1, ["infer.quant=int8"]) == pp1


def test_wanda_at_two_stages_equals_one_process(tmp_path):
    """Each stage reads only its layers, collects its own layers' inputs from the stage before, and writes its own
    shards: the export is bitwise the one-process one (a tied model: the last stage re-reads the embedding)."""
    import os

    import torch
    from safetensors.torch import load_file

    from framework.compress.run import compress
    from framework.config import CalibConfig, CompressConfig
    from tests.helpers import make_hf_model

    src = tmp_path / "hf"
    make_hf_model(str(src), n_layers=4, init_std=0.05, tie=True)
    calib = ["calib.data=synthetic", "calib.samples=16", "calib.seq_len=32"]
    two = tmp_path / "two"
    assert_ok(run_module("framework.compress", [f"model_dir={src}", f"out={two}", "method=wanda", "sparsity=2:4",
                                                *calib], nproc=2))
    one = compress(CompressConfig(model_dir=str(src), out=str(tmp_path / "one"), method="wanda", sparsity="2:4",
                                  calib=CalibConfig(data="synthetic", samples=16, seq_len=32)))

    def tensors(d):
        out = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                out.update(load_file(os.path.join(d, f)))
        return out

    a, b = tensors(one), tensors(two)
    assert len([f for f in os.listdir(two) if f.endswith(".safetensors")]) == 2
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((two / "config.json").read_text()) == json.loads(open(os.path.join(one, "config.json")).read())
