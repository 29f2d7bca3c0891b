"""Export from a tensor-parallel run; transformers loads it with the same logits and greedy tokens as our model."""

import json

import pytest
import torch

from tests.helpers import TINY_TRAIN, assert_ok, run_module

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    out = {}
    for name, nproc, extra in (("tp2", 2, ["parallel.tp=2", "model.tie_embeddings=true"]),
                               ("single", 1, ["model.tie_embeddings=true"])):
        run = tmp_path_factory.mktemp(name)
        args = [a for a in TINY_TRAIN if not a.startswith(("checkpoint.export", "checkpoint.save_final"))]
        proc = run_module("framework.train", [*args, "trainer.max_steps=6", f"run_dir={run}",
                                              "checkpoint.max_shard_size_mb=0", *extra], nproc=nproc)
        assert_ok(proc)
        out[name] = run / "export"
        out[name + "_run"] = run
    return out


def test_transformers_loads_export(exports):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from framework.infer.loader import read_model_args
    from framework.models.llama import build_model
    from framework.weights.io import load_hf_weights

    path = exports["tp2"]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded (tiny shard size)
    assert "lm_head.weight" not in index["weight_map"]  # tied, like transformers saves it
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    ours = build_model(read_model_args(str(path)), seed=None).eval()
    load_hf_weights(ours, str(path))
    ids = torch.tensor([tok("reverse: 1 2 3 =")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
        gen = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        seq = ids
        for _ in range(len(gen)):
            seq = torch.cat([seq, ours(seq)[:, -1:].argmax(-1)], dim=1)
    assert seq[0, ids.shape[1]:].tolist() == gen.tolist()


def test_tensor_parallel_export_equals_single_process(exports):
    from safetensors.torch import load_file

    def load_all(path):
        tensors = {}
        for f in sorted(path.glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        return tensors

    a, b = load_all(exports["tp2"]), load_all(exports["single"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_export_command_from_checkpoint(exports, tmp_path):
    """A checkpoint saved at tp=2 exports from its per-parameter state in one process, without DeepSpeed,
    bitwise equal to the export the run wrote at its end; generate accepts the checkpoint itself."""
    from safetensors.torch import load_file

    run = exports["tp2_run"]
    out = tmp_path / "again"
    assert_ok(run_module("framework.export", [f"checkpoint={run}", f"out={out}"], nproc=1))
    assert json.loads((out / "config.json").read_text()) == json.loads((exports["tp2"] / "config.json").read_text())
    a = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    b = {k: v for f in sorted(exports["tp2"].glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    step_dir = run / "checkpoints" / "step-000006"
    results = tmp_path / "out.jsonl"
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"prompt": "reverse: 1 2 3 =", "max_new_tokens": 6}) + "\n")
    proc = run_module("framework.generate", [f"model_dir={step_dir}", f"prompts={prompts}", f"output={results}",
                                             "infer.pp=2"], nproc=2)
    assert_ok(proc)
    assert "exporting" in proc.stderr and (step_dir / "export" / "config.json").is_file()
    from_checkpoint = json.loads(results.read_text().splitlines()[0])["token_ids"]
    assert_ok(run_module("framework.generate", [f"model_dir={exports['tp2']}", f"prompts={prompts}",
                                                f"output={results}"]))
    assert json.loads(results.read_text().splitlines()[0])["token_ids"] == from_checkpoint
