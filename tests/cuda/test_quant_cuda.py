"""Quantized layers on a GPU under the compiled decode's CUDA graphs: the int8 / int4 weights (and int4's packed
layout and scales) are module buffers, so ``torch.compile(mode="reduce-overhead")`` treats them as static and a
replay reads them where they are, with no per-step copy; the compiled result equals eager. Skipped, saying so,
where no CUDA device is visible."""

import pytest
import torch
import torch.nn as nn

from framework.compress.quantize import Int4Linear, Int8Linear

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: none is visible here")]


def quantized(kind: str, out_f: int, in_f: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=False).cuda().bfloat16()
    if kind == "int8":
        return Int8Linear.from_linear(lin)
    mod = Int4Linear.from_linear(lin, 64)
    mod.pack()
    return mod


def copies_in_replay(step, x) -> list[str]:
    """Names of the copy operations a replay of ``step(x)`` runs (cudagraph trees copy non-static inputs)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.compiler.cudagraph_mark_step_begin()
        step(x)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.name == "aten::copy_" or "memcpy" in e.name.lower()]


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_compiled_decode_reads_quantized_weights_without_copies(kind):
    first, second = quantized(kind, 512, 256, 0), quantized(kind, 256, 512, 1)
    weight = "qweight" if kind == "int8" else "packed"
    for mod in (first, second):
        assert isinstance(dict(mod.named_buffers()).get(weight), torch.Tensor), f"{weight} is not a buffer"
    net = nn.Sequential(first, nn.SiLU(), second).eval()
    step = torch.compile(net, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.mark_static_address(x)  # the engine's inputs are static too (staged, cache marked static)
    with torch.inference_mode():
        want = net(x)
        for _ in range(3):  # warm-up, record, replay
            torch.compiler.cudagraph_mark_step_begin()
            got = step(x).clone()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        assert copies_in_replay(step, x) == []
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
