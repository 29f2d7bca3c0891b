"""CUDA paths of compression: the int8/int4 kernels and 2:4 semi-structured sparsity. Skipped without a GPU."""

import pytest
import torch
import torch.nn as nn

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_cuda_quantized_linear_matches_reference(kind):
    from framework.compress.quantize import Int4Linear, Int8Linear

    torch.manual_seed(0)
    lin = nn.Linear(512, 256, bias=False).cuda().bfloat16()
    mods = [Int8Linear.from_linear(lin)] if kind == "int8" else [Int4Linear.from_linear(lin, 64)]
    mods.append(type(mods[0]).cat([type(mods[0]).from_linear(lin, *([] if kind == "int8" else [64]))] * 2))
    x = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ mods[0].dequantized().float().t()
    y = mods[0](x)
    assert y.dtype == torch.bfloat16
    assert float((y.float() - ref).abs().max() / ref.abs().max()) < 2**-5
    assert torch.equal(mods[1](x), torch.cat([y, y], dim=-1))


def test_semi_structured_2_4_matches_dense():
    from framework.compress.prune import Sparsity, apply_semi_structured, prune_mask

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("semi-structured sparsity needs compute capability 8.0+")
    torch.manual_seed(0)
    model = nn.Module()
    model.down_proj = nn.Linear(256, 128, bias=False).cuda().half()
    with torch.no_grad():
        w = model.down_proj.weight
        w[prune_mask(w.abs().float(), Sparsity(0.5, (2, 4)), per_row=True)] = 0
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)
    dense = model.down_proj(x)
    assert apply_semi_structured(model) == 1
    assert torch.allclose(model.down_proj(x), dense, atol=1e-2, rtol=1e-2)
