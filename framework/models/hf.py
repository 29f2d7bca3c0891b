"""Hugging Face config.json <-> our ModelArgs. Reading and writing the weights is framework/weights/ (io.py,
shards.py): our parameter names are Hugging Face's, so a checkpoint maps one to one."""

from __future__ import annotations

import json
import os

from framework.cli import UserError
from framework.models.llama import ModelArgs

SUPPORTED = ("llama", "qwen2")


def to_hf_config(args: ModelArgs, torch_dtype: str = "float32", eos_token_id=None, pad_token_id=None) -> dict:
    """config.json for transformers: Qwen2 when q/k/v carry a bias, Llama otherwise."""
    qwen = args.qkv_bias
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": args.init_std,
        "torch_dtype": torch_dtype,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "bos_token_id": None,
        "use_cache": True,
    }
    if args.rope_scaling_factor is not None:
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max_seq_len,
        }
    if qwen:
        cfg.pop("attention_bias")
        cfg.pop("mlp_bias")
    return cfg


def from_hf_config(cfg: dict, name: str = "hf") -> ModelArgs:
    """ModelArgs from a Llama or Qwen2 config.json dict."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise UserError(f"model_type '{model_type}' is not supported: use a Llama or Qwen2 checkpoint")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError("attention_bias/mlp_bias Llama variants are not supported")
    n_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    if head_dim * n_heads != cfg["hidden_size"]:
        raise UserError("head_dim * num_attention_heads must equal hidden_size")
    scaling = cfg.get("rope_scaling") or {}
    rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    if not scaling and (cfg.get("rope_parameters") or {}).get("rope_type") == "llama3":
        scaling = cfg["rope_parameters"]
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
        raise UserError(f"rope scaling '{scaling.get('rope_type')}' is not supported (llama3 or none)")
    llama3 = bool(scaling) and scaling.get("rope_type", scaling.get("type")) == "llama3"
    return ModelArgs(
        name=name,
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        ffn_dim=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling_factor=float(scaling["factor"]) if llama3 else None,
        rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)) if llama3 else 1.0,
        rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)) if llama3 else 4.0,
        rope_original_max_seq_len=int(scaling.get("original_max_position_embeddings", 8192)) if llama3 else 8192,
        qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_std=cfg.get("initializer_range", 0.02),
    )


def read_hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"no config.json in {model_dir}: point at a Hugging Face model directory or an export")
    with open(path) as f:
        return json.load(f)


def has_tokenizer(model_dir: str) -> bool:
    """Whether a Hugging Face directory carries tokenizer files."""
    return any(os.path.isfile(os.path.join(model_dir, f))
               for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json"))

