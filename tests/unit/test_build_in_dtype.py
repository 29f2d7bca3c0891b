"""The training model built straight in bf16 (ZeRO 0-2 at tp 1) holds exactly what DeepSpeed's cast of the fp32
build held: the same seeded numbers, rounded once, and the rotary buffer still in fp32."""

import torch

from framework.models.llama import ModelArgs, build_model
from framework.parallel.materialize import build_in_dtype


def test_bf16_build_equals_the_cast_fp32_build():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, ffn_dim=96, max_seq_len=32)
    ref = build_model(args, device="cpu", seed=3)
    got = build_in_dtype(args, torch.device("cpu"), torch.bfloat16, seed=3)
    ref_params, got_params = dict(ref.named_parameters()), dict(got.named_parameters())
    assert ref_params.keys() == got_params.keys()
    for name, p in got_params.items():
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p, ref_params[name].to(torch.bfloat16)), name
    assert got.inv_freq.dtype == torch.float32 and torch.equal(got.inv_freq, ref.inv_freq)
    assert got.lm_head.weight is not None
