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


def test_int8_export_at_tp2_equals_tp1(tmp_path):
    """A compressed export slices like the plain weights: each tp rank reads its rows (q/k/v, gate/up, with their
    scales) or columns (o, down) of the int8 tensors, and tp=2 gives tp=1's tokens."""
    method, extra = "int8", []
    from tests.helpers import make_hf_model

    src = tmp_path / "hf"
    make_hf_model(str(src), n_layers=2, init_std=0.05)
    out = tmp_path / method
    assert_ok(run_module("framework.compress", [f"model_dir={src}", f"out={out}", f"method={method}", *extra]))
    one = generate(out, tmp_path, 1)
    prompts = tmp_path / "in.jsonl"
    two = tmp_path / "tp2.jsonl"
    proc = run_module("framework.generate", [f"model_dir={out}", f"prompts={prompts}", f"output={two}", "infer.tp=2",
                                             "infer.max_new_tokens=16", "infer.ignore_eos=true"], nproc=2)
    assert_ok(proc)
    assert [json.loads(line)["token_ids"] for line in two.read_text().splitlines()] == one


def test_int4_export_slices_to_the_parts_of_the_whole_layer(tmp_path):
    """int4 at tp=2, layer by layer against the unsliced layer: a column-parallel layer's two parts are its output
    rows, a row-parallel layer's two partial products sum to its output (groups cut at their boundaries). Tokens
    are not compared: the int4 kernels round their bf16 partial sums differently from one whole sum."""
    import torch

    from framework.compress.quantize import load_quantized
    from framework.compress.run import compress
    from framework.config import CompressConfig, QuantConfig
    from framework.infer.loader import read_hf_config, read_model_args
    from framework.models.llama import Llama
    from tests.helpers import make_hf_model

    src = tmp_path / "hf"
    make_hf_model(str(src), n_layers=1, init_std=0.05)
    out = compress(CompressConfig(model_dir=str(src), out=str(tmp_path / "int4"), method="int4",
                                  quant=QuantConfig(group_size=32)))
    args = read_model_args(out)
    qconfig = read_hf_config(out)["quantization_config"]

    def layer(tp, rank):
        with torch.device("meta"):
            model = Llama(args)
        names = [n for n in model.state_dict() if ".layers.0." in n and n.endswith("proj.weight")]
        load_quantized(model, out, names, qconfig, "cpu", torch.float32, tp, rank, lambda rest: None)
        return model.model.layers["0"]

    whole, parts = layer(1, 0), [layer(2, r) for r in range(2)]
    torch.manual_seed(0)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj"):
        m = whole.get_submodule(name)
        x = torch.randn(3, m.in_features)
        want = m(x)
        got = torch.cat([p.get_submodule(name)(x) for p in parts], dim=-1)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        m = whole.get_submodule(name)
        x = torch.randn(3, m.in_features)
        want = m(x)
        half = m.in_features // 2
        got = sum(p.get_submodule(name)(x[:, r * half: (r + 1) * half]) for r, p in enumerate(parts))
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_int4_groups_cut_by_tp_are_refused_in_one_line(tmp_path):
    from tests.helpers import error_lines, make_hf_model

    src = tmp_path / "hf"
    make_hf_model(str(src), n_layers=1, init_std=0.05)
    out = tmp_path / "int4"
    assert_ok(run_module("framework.compress", [f"model_dir={src}", f"out={out}", "method=int4", "quant.group_size=64"]))
    proc = run_module("framework.generate", [f"model_dir={out}", "prompt=hi", "infer.tp=2"], nproc=2)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and "int4 group of 64" in lines[0] and "group size that divides 32" in lines[0], proc.stderr


def test_int4_head_rows_the_kernel_cannot_run_are_refused(tmp_path):
    """A quantized int4 head split by vocabulary rows at tp=2: a part whose row count is not a multiple of 16
    (the int4 kernel's tile) is refused in one line naming the way out, before anything runs."""
    import torch
    import transformers

    from framework.cli import UserError
    from framework.compress.quantize import load_quantized
    from framework.compress.run import compress
    from framework.config import CompressConfig, QuantConfig
    from framework.infer.loader import read_hf_config, read_model_args
    from framework.models.llama import Llama
    from framework.weights.layout import vocab_range
    from tests.helpers import make_hf_model

    src = tmp_path / "hf"
    make_hf_model(str(src), n_layers=1, init_std=0.05)  # its tokenizer; the weights are replaced below
    # a head the int4 kernel takes whole (a multiple of 16 rows) but not in halves (136 rows a rank)
    cfg = transformers.LlamaConfig(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(src))
    out = compress(CompressConfig(model_dir=str(src), out=str(tmp_path / "int4"), method="int4",
                                  quant=QuantConfig(group_size=32, head=True)))
    args = read_model_args(out)
    qconfig = read_hf_config(out)["quantization_config"]
    lo, hi = vocab_range(args.vocab_size, 2, 0)
    assert (hi - lo) % 16, f"the test needs a vocabulary whose halves are not multiples of 16 ({args.vocab_size})"
    with torch.device("meta"):
        model = Llama(args)
    with pytest.raises(UserError, match=rf"lm_head: infer.tp=2 leaves {hi - lo} output rows a rank.*use another "
                                        r"tp, or int8"):
        load_quantized(model, out, ["lm_head.weight"], qconfig, "cpu", torch.float32, 2, 0, lambda rest: None)
