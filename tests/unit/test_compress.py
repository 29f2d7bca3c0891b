"""Compression, one process: quantized linears against their dequantized reference, the file layout, pruning
masks, the engine loading a compressed export, transformers loading it, and bad input."""

import json
import os

import pytest
import torch
import torch.nn as nn

from framework.cli import UserError
from framework.compress import format as fmt
from framework.compress.prune import Sparsity, is_n_m, parse_sparsity, prune_mask
from framework.compress.quantize import Int4Linear, Int8Linear, quantize_int4, quantize_int8, quantize_linears
from framework.config import CalibConfig, CompressConfig, QuantConfig
from framework.weights.io import pack_int32, unpack_int32

# The kernels take activations in bf16 (framework/compress/quantize.py) and return bf16 products: against the
# fp32 product with the same dequantized weights, the error is bf16 rounding, a few 2**-8 of the output's scale.
TOL = 2**-6


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("rows", [1, 7, 200])
@pytest.mark.parametrize("kind", ["int8", "int4-32", "int4-64", "int4-128-sym"])
def test_quantized_linear_matches_dequantized_reference(kind, rows):
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True)
    if kind == "int8":
        mod = Int8Linear.from_linear(lin)
    else:
        _, g, *sym = kind.split("-")
        mod = Int4Linear.from_linear(lin, int(g), symmetric=bool(sym))
    ref_w = mod.dequantized()
    x = torch.randn(rows, 256)
    ref = x @ ref_w.t() + lin.bias.detach()
    y = mod(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    assert rel_err(y, ref) < TOL
    # ... and the dequantized weight is the weight to within half a quantization step
    w = lin.weight.detach()
    if kind == "int8":  # the dequantized weight is the weight to within half a step
        assert float((ref_w - w).abs().max()) <= float(w.abs().amax() / 127) * 0.51 + 1e-6
    else:  # the clip search never does worse than the plain min/max grid, group by group
        from framework.compress.quantize import _int4_grid

        g = int(kind.split("-")[1])
        q, s, z = _int4_grid(w.reshape(96, -1, g), 1.0, kind.endswith("sym"))
        plain = ((q - z[..., None]) * s[..., None]).reshape(96, 256)
        assert ((ref_w - w).pow(2).reshape(96, -1, g).sum(-1) <= (plain - w).pow(2).reshape(96, -1, g).sum(-1) + 1e-9).all()
    # bf16 models run in bf16
    if kind == "int8":
        mod16 = Int8Linear.from_linear(lin.bfloat16())
    else:
        mod16 = Int4Linear.from_linear(lin.bfloat16(), int(g), symmetric=bool(sym))
    ref16 = x @ mod16.dequantized().t() + lin.bias.detach().float()
    y16 = mod16(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and rel_err(y16.float(), ref16) < 2 * TOL


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_cat_is_exact_concatenation(cls):
    torch.manual_seed(1)
    lins = [nn.Linear(128, n, bias=False) for n in (64, 32, 32)]
    mods = [cls.from_linear(m) if cls is Int8Linear else cls.from_linear(m, 32) for m in lins]
    fused = cls.cat(mods)
    x = torch.randn(5, 128)
    assert torch.equal(fused(x), torch.cat([m(x) for m in mods], dim=-1))


def test_int4_uses_integer_zero_points_and_int8_is_symmetric():
    torch.manual_seed(2)
    w = torch.randn(32, 64) + 0.5  # skewed groups: an asymmetric range helps
    q, scale, zp = quantize_int4(w, 32)
    assert q.dtype == zp.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7 and zp.abs().max() <= 8
    err_asym = (unpack_int32(pack_int32(q, 4), 4, 64).float() - zp.float().repeat_interleave(32, 1)) * \
        scale.repeat_interleave(32, 1) - w
    q_s, s_s, _ = quantize_int4(w, 32, symmetric=True)
    err_sym = q_s.float() * s_s.repeat_interleave(32, 1) - w
    assert err_asym.abs().mean() < err_sym.abs().mean()
    q8, s8 = quantize_int8(w)
    assert q8.abs().max() == 127 and torch.allclose(q8.float() * s8[:, None], w, atol=float(s8.max()) / 2 + 1e-7)


@pytest.mark.parametrize("bits,dim", [(4, 1), (4, 0), (8, 1)])
def test_pack_unpack_round_trip(bits, dim):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    q = torch.randint(lo, hi, (24, 40), dtype=torch.int8)
    packed = pack_int32(q, bits, dim)
    assert packed.dtype == torch.int32
    assert torch.equal(unpack_int32(packed, bits, q.shape[dim], dim), q)


def test_quantize_linears_skips_head_and_tied_weights():
    from framework.models.llama import ModelArgs, build_model

    model = build_model(ModelArgs(dim=64, n_layers=2, n_heads=4, ffn_dim=128, vocab_size=96))
    assert quantize_linears(model, "int8") == 14  # 7 a layer, not the head
    assert isinstance(model.lm_head, nn.Linear) and type(model.lm_head) is nn.Linear
    tied = build_model(ModelArgs(dim=64, n_layers=1, n_heads=4, ffn_dim=128, vocab_size=96, tie_embeddings=True))
    assert quantize_linears(tied, "int4", group_size=32, head=True) == 7  # the tied head stays


def test_sparsity_parsing_and_masks():
    assert parse_sparsity(0.5) == Sparsity(0.5) and parse_sparsity("2:4") == Sparsity(0.5, (2, 4))
    torch.manual_seed(3)
    score = torch.rand(8, 16)
    m = prune_mask(score, Sparsity(0.25), per_row=True)
    assert (m.sum(1) == 4).all() and (score[m].max() <= score[~m].view(8, -1).min(1).values.max())
    m24 = prune_mask(score, Sparsity(0.5, (2, 4)), per_row=True)
    assert is_n_m(score.masked_fill(m24, 0)) and int(m24.sum()) == 64
    glob = prune_mask(score, Sparsity(0.5), per_row=False)
    assert int(glob.sum()) == 64 and score[glob].max() <= score[~glob].min()


def test_wanda_keeps_small_weights_on_loud_inputs():
    from framework.compress.prune import wanda_prune_layer

    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.1, 1.0, 1.0], [1.0, 1.0, 0.1, 1.0]]))
    sq = {"l": torch.tensor([1.0, 10000.0, 1.0, 1.0])}  # feature 1 is 100x louder
    wanda_prune_layer([("l", lin)], sq, Sparsity(0.25))
    w = lin.weight
    assert w[0, 1] != 0 and (w[0] == 0).sum() == 1  # magnitude would have dropped w[0, 1]
    assert w[1, 2] == 0


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2", "3:2", "2:x", "0:4", "half"])
def test_bad_sparsity_is_one_line(value):
    with pytest.raises(UserError) as e:
        parse_sparsity(value)
    assert "\n" not in str(e.value) and "sparsity" in str(e.value)


# -- export, loaders ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.helpers import make_hf_model

    path = str(tmp_path_factory.mktemp("hf"))
    make_hf_model(path, n_layers=2, init_std=0.05)
    return path


def compress_to(src, out, method, **kw):
    from framework.compress.run import compress

    quant = QuantConfig(**{k: v for k, v in kw.items() if k in ("group_size", "head", "symmetric")})
    calib = CalibConfig(**{k: v for k, v in kw.items() if k in ("data", "samples", "seq_len", "paths")})
    return compress(CompressConfig(model_dir=src, out=str(out), method=method, sparsity=kw.get("sparsity"),
                                   quant=quant, calib=calib))


def reference_logits(src, method, tokens, group_size=32):
    """Our plain model with each quantized linear replaced by its dequantized weight, in fp32."""
    from framework.compress.quantize import quantizable_linears
    from framework.compress.run import load_plain
    from framework.infer.loader import read_model_args

    model = load_plain(src, read_model_args(src))
    with torch.no_grad():
        for _, lin in quantizable_linears(model):
            mod = Int8Linear.from_linear(lin) if method == "int8" else Int4Linear.from_linear(lin, group_size)
            lin.weight.copy_(mod.dequantized())
        return model(tokens)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_export_loads_through_engine_loader(hf_dir, tmp_path, method):
    from framework.evaluation.perplexity import load_for_eval
    from framework.infer.worker import forward_logits

    out = compress_to(hf_dir, tmp_path / method, method, group_size=32)
    cfg = json.load(open(os.path.join(out, "config.json")))
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["ignore"] == ["lm_head"]
    assert q["config_groups"]["group_0"]["weights"]["num_bits"] == (8 if method == "int8" else 4)
    assert cfg["compression_config"]["unquantized"][:1] == ["model.embed_tokens"]
    assert os.path.isfile(os.path.join(out, "tokenizer.json")) and os.path.isfile(os.path.join(out, "generation_config.json"))
    assert fmt.dir_size_bytes(out) < 0.6 * fmt.dir_size_bytes(hf_dir)
    weights, _ = load_for_eval(out, "fp32")
    kinds = {type(m).__name__ for m in weights.modules()}
    assert ("Int8Linear" if method == "int8" else "Int4Linear") in kinds
    tokens = torch.randint(0, 200, (2, 10))
    ref = reference_logits(hf_dir, method, tokens)
    assert rel_err(forward_logits(weights, tokens), ref) < TOL
    # quantizing while loading gives the same weights as the export
    live, _ = load_for_eval(hf_dir, "fp32", quant=method, group_size=32)
    assert torch.equal(forward_logits(live, tokens), forward_logits(weights, tokens))


@pytest.mark.parametrize("method,extra", [("int8", {}), ("int4", {"symmetric": True})])
def test_export_loads_in_transformers(hf_dir, tmp_path, method, extra):
    pytest.importorskip("compressed_tensors", reason="transformers reads compressed-tensors exports through it")
    import transformers

    out = compress_to(hf_dir, tmp_path / method, method, group_size=32, **extra)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = torch.randint(0, 200, (2, 10))
    from framework.compress.run import load_plain
    from framework.infer.loader import read_model_args

    model = load_plain(hf_dir, read_model_args(hf_dir))
    from framework.compress.quantize import quantizable_linears

    with torch.no_grad():
        for _, lin in quantizable_linears(model):
            mod = Int8Linear.from_linear(lin) if method == "int8" else Int4Linear.from_linear(lin, 32, symmetric=True)
            lin.weight.copy_(mod.dequantized())
        assert torch.allclose(hf(tokens).logits, model(tokens), atol=1e-5, rtol=1e-5)


def test_pruned_exports_are_dense_and_sparse(hf_dir, tmp_path):
    from safetensors.torch import load_file

    out = compress_to(hf_dir, tmp_path / "w24", "wanda", sparsity="2:4", data="synthetic", samples=8, seq_len=16)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert "quantization_config" not in cfg and cfg["compression_config"]["pattern"] == "2:4"
    assert cfg["compression_config"]["measured_sparsity"] == 0.5
    tensors = {}
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(out, f)))
    assert is_n_m(tensors["model.layers.0.mlp.down_proj.weight"]) and tensors["lm_head.weight"].ne(0).all()
    mag = compress_to(hf_dir, tmp_path / "m50", "magnitude", sparsity=0.5)
    from framework.evaluation.perplexity import load_for_eval

    weights, _ = load_for_eval(mag, "fp32")  # a plain export: loads as one
    assert type(weights.layers[0].qkv) is not Int8Linear


@pytest.mark.parametrize("kw,message", [
    ({"method": "int4", "group_size": 128}, "does not divide the 64 input features"),
    ({"method": "int4", "group_size": 48}, "group_size=48"),
    ({"method": "wanda", "sparsity": "1.2"}, "outside (0, 1)"),
    ({"method": "magnitude", "sparsity": "4:2"}, "not a valid N:M"),
    ({"method": "magnitude", "sparsity": "2:3"}, "not a multiple of 3"),
    ({"method": "wanda", "sparsity": "0.5", "data": "files"}, "calibration text is missing"),
    ({"method": "wanda", "sparsity": "0.5", "data": "files", "paths": ["/nonexistent.txt"]}, "nonexistent"),
    ({"method": "wanda", "sparsity": "0.5", "data": None}, "needs calibration data"),
    ({"method": "int3"}, "method=int3"),
])
def test_bad_input_before_any_work(hf_dir, tmp_path, kw, message):
    method = kw.pop("method")
    with pytest.raises(UserError) as e:
        compress_to(hf_dir, tmp_path / "out", method, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out")


def test_already_compressed_is_refused(hf_dir, tmp_path):
    out = compress_to(hf_dir, tmp_path / "int8", "int8")
    with pytest.raises(UserError, match="already compressed"):
        compress_to(out, tmp_path / "again", "int4", group_size=32)


# -- the CPU decode kernels (framework/kernels/quant_gemv.cpp) -------------------------------------------------
def kernel_layer(kind: str, out_f: int, in_f: int, seed: int = 0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=False)
    if kind == "int8":
        return Int8Linear.from_linear(lin)
    return Int4Linear.from_linear(lin, int(kind.split("-")[1]))


def assert_fp32_product(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y equals x @ w.T (w the dequantized weight) up to the kernel's fp32 summation: each of 16 lanes adds K/16
    products in order, a 4-level tree adds the lanes, int8's scale is one more rounding, so each output is within
    (K/16 + 6) fp32 ulps of sum_k |x_k w_k| (the classic bound; the products themselves are exact in fp32)."""
    ref = x.double() @ w.double().t()
    bound = (x.shape[1] / 16 + 6) * 2.0**-24 * (x.double().abs() @ w.double().abs().t())
    assert ((y.double() - ref).abs() <= bound + 1e-30).all(), float(((y.double() - ref).abs() / bound).max())


needs_kernels = pytest.mark.skipif(not __import__("framework.kernels.cpu_quant", fromlist=["x"]).available(),
                                   reason="the CPU decode kernels did not build here (no C++ compiler)")


@needs_kernels
@pytest.mark.parametrize("shape", [(37, 100), (96, 256), (130, 529), (64, 1536)])
def test_cpu_fp32_kernel_is_the_fp32_product(shape):
    """The fp32 few-row kernel (inference's StreamLinear): x @ w.T within its summation's rounding, at every row
    count its passes take (1-6 rows a pass, then more passes), a row's bits whatever shares its call."""
    from framework.kernels import cpu_quant

    torch.manual_seed(0)
    w = torch.randn(shape)
    for rows in (1, 3, 5, 6, 8, 13):
        x = torch.randn(rows, shape[1])
        y = cpu_quant.f32_gemv(x, w)
        assert y.shape == (rows, shape[0])
        assert_fp32_product(y, x, w)
        assert all(torch.equal(cpu_quant.f32_gemv(x[i: i + 1], w), y[i: i + 1]) for i in range(rows))


@needs_kernels
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("kind,shape", [("int8", (37, 100)), ("int8", (96, 256)), ("int8", (130, 529)),
                                        ("int4-32", (48, 96)), ("int4-64", (33, 320)), ("int4-128", (40, 384)),
                                        ("int4-256", (17, 512))])
def test_cpu_kernel_is_the_dequantized_fp32_product(kind, shape, rows):
    mod = kernel_layer(kind, *shape)
    w = mod.dequantized()
    x = torch.randn(rows, shape[1])
    y = mod(x)
    assert y.dtype == torch.float32 and y.shape == (rows, shape[0])
    assert_fp32_product(y, x, w)
    # a row's result does not depend on what shares its batch (nor on the thread split): tp slices stay exact
    assert torch.equal(mod(x[-1:]), y[-1:])
    # bf16 models: the same fp32 product, rounded once to bf16
    y16 = mod(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, mod(x.bfloat16().float()).bfloat16())


@needs_kernels
def test_cpu_kernels_under_torch_compile_and_dispatch_by_rows():
    """Compiled (fullgraph: the kernels are opaque custom ops with fake implementations) equals eager to the bit,
    at batch 1 and 8; int8 above GEMV_MAX_ROWS rows takes aten's bf16 kernel."""
    from framework.compress.quantize import GEMV_MAX_ROWS

    a, b = kernel_layer("int8", 64, 96), kernel_layer("int4-32", 96, 64, seed=1)
    net = nn.Sequential(a, nn.SiLU(), b)
    step = torch.compile(net, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for rows in (1, 8):
            x = torch.randn(rows, 96)
            assert torch.equal(step(x), net(x))
    assert isinstance(b.packed, torch.Tensor) and "packed" in dict(b.named_buffers())  # static for CUDA graphs
    x = torch.randn(GEMV_MAX_ROWS + 1, 96)
    assert_fp32_product(a(x[:GEMV_MAX_ROWS]), x[:GEMV_MAX_ROWS], a.dequantized())
    big = a(x)  # aten: activations rounded to bf16, so no longer the fp32 product, but within bf16 rounding of it
    ref = x @ a.dequantized().t()
    assert not torch.equal(big[:GEMV_MAX_ROWS], a(x[:GEMV_MAX_ROWS])) and rel_err(big, ref) < TOL


def test_layers_fall_back_to_aten_kernels_without_a_compiler():
    """No compiler (or MIAOTUI_QUANT_KERNELS=0): the layers keep PyTorch's kernels, same results to bf16 rounding."""
    from framework.kernels import cpu_quant

    for kind in ("int8", "int4-32"):
        with cpu_quant.disabled():  # int8 picks its kernel when built, int4 when packed
            mod = kernel_layer(kind, 48, 128)
            ref_w = mod.dequantized()
            if isinstance(mod, Int4Linear):
                mod.pack()
        x = torch.randn(3, 128)
        y = mod(x)
        assert getattr(mod, "gemv_rows", 0) == 0 and getattr(mod, "kernel_zero", None) is None
        assert rel_err(y, x @ ref_w.t()) < TOL
