"""Our model against transformers' LlamaForCausalLM / Qwen2ForCausalLM with the same weights (fp32, 1e-5)."""

import pytest
import torch
import transformers

from framework.models.hf import from_hf_config, to_hf_config
from framework.models.llama import ModelArgs, build_model
from framework.weights.io import load_hf_weights


def hf_twin(args: ModelArgs):
    cfg = to_hf_config(args)
    cls = transformers.Qwen2ForCausalLM if args.qkv_bias else transformers.LlamaForCausalLM
    conf = (transformers.Qwen2Config if args.qkv_bias else transformers.LlamaConfig)(**cfg)
    return cls(conf)


@pytest.mark.parametrize("qkv_bias,tie,gqa,llama3", [
    (False, False, True, False), (False, True, True, True), (False, False, False, False),
    (True, False, True, False), (True, True, True, False),
])
def test_logits_match_transformers(qkv_bias, tie, gqa, llama3):
    args = ModelArgs(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2 if gqa else None, ffn_dim=160,
                     qkv_bias=qkv_bias, tie_embeddings=tie, rope_theta=5000.0, max_seq_len=128,
                     rope_scaling_factor=8.0 if llama3 else None, rope_original_max_seq_len=32)
    ours = build_model(args, seed=3)
    with torch.no_grad():  # non-trivial biases and norms
        for name, p in ours.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                p.normal_(0.5, 0.2)
    hf = hf_twin(args)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.eval()
    x = torch.randint(0, 97, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)


def test_config_roundtrip_and_import(tmp_path):
    args = ModelArgs(vocab_size=50, dim=32, n_layers=3, n_heads=4, n_kv_heads=1, ffn_dim=64, tie_embeddings=True,
                     rope_scaling_factor=32.0)
    back = from_hf_config(to_hf_config(args), name=args.name)
    assert back == args
    hf = hf_twin(args)
    hf.save_pretrained(tmp_path)
    ours = build_model(from_hf_config(hf.config.to_dict()), seed=None)
    load_hf_weights(ours, str(tmp_path))
    x = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)


def test_flavor_sizes():
    from hydra import compose, initialize_config_dir

    import framework.config  # noqa: F401  registers the schemas
    from framework.cli import CONFIG_DIR

    expected = {"debug": (0, 1e6), "125m": (110e6, 140e6), "1b": (1.1e9, 1.35e9), "8b": (7.9e9, 8.1e9),
                "70b": (70.0e9, 71.0e9)}
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for flavor, (lo, hi) in expected.items():
            cfg = compose("train", overrides=[f"model={flavor}", "run_dir=x"])
            m = dict(cfg.model)
            m["vocab_size"] = m["vocab_size"] or (512 if flavor == "debug" else 32000)
            n = ModelArgs(**m).num_params()
            assert lo <= n <= hi, (flavor, n)
