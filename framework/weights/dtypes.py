"""The one dtype table: our precision names (``parallel.precision``, ``infer.dtype``), torch dtypes, the names
Hugging Face writes in config.json's ``torch_dtype``, and bytes per element."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.cli import UserError


@dataclass(frozen=True)
class DType:
    precision: str  # our name: fp32, bf16, fp16
    torch: torch.dtype
    hf: str  # config.json's torch_dtype
    bytes: int  # per element


TABLE = (
    DType("fp32", torch.float32, "float32", 4),
    DType("bf16", torch.bfloat16, "bfloat16", 2),
    DType("fp16", torch.float16, "float16", 2),
)
PRECISIONS = tuple(d.precision for d in TABLE)
PRECISION_DTYPES = {d.precision: d.torch for d in TABLE}  # fp32 -> torch.float32, ...
_BY_PRECISION = {d.precision: d for d in TABLE}
_BY_TORCH = {d.torch: d for d in TABLE}
_BY_HF = {d.hf: d for d in TABLE}


def lookup(precision: str, key: str = "dtype") -> DType:
    """The row of ``precision`` (fp32, bf16, fp16); UserError naming ``key`` (the setting) for anything else."""
    if precision not in _BY_PRECISION:
        raise UserError(f"{key}={precision}: use {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}")
    return _BY_PRECISION[precision]


def torch_dtype(precision: str, key: str = "dtype") -> torch.dtype:
    """torch dtype of a precision name; UserError naming ``key`` for an unknown one."""
    return lookup(precision, key).torch


def element_bytes(precision: str, key: str = "dtype") -> int:
    """Bytes per element of a precision name."""
    return lookup(precision, key).bytes


def hf_name(dtype: torch.dtype) -> str:
    """config.json's ``torch_dtype`` for a torch dtype (float32, bfloat16, float16)."""
    return _BY_TORCH[dtype].hf


def config_precision(hf_config: dict) -> str:
    """The precision a Hugging Face config.json says its weights are in (``torch_dtype``, or transformers' newer
    ``dtype``); fp32 when absent or of a dtype we do not run."""
    name = str(hf_config.get("torch_dtype", hf_config.get("dtype", "float32")))
    return _BY_HF[name].precision if name in _BY_HF else "fp32"


def config_dtype(hf_config: dict) -> torch.dtype:
    """The torch dtype of ``config_precision``."""
    return PRECISION_DTYPES[config_precision(hf_config)]
