"""Sampling: small pure functions on the last stage's logits.

Each request has its own ``torch.Generator`` seeded from its seed, so the same seed gives the same text whatever
the number of stages or the batch it shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule: divide positive logits of seen tokens by ``penalty``, multiply negative ones. (V,)"""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1, None]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    cum = probs.cumsum(-1)
    drop = cum - probs >= p  # tokens after the set already reached p
    drop[..., 0] = False
    mask = torch.zeros_like(drop).scatter(-1, idx, drop)
    return logits.masked_fill(mask, float("-inf"))


def sample_token(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
                 generator: torch.Generator | None) -> int:
    """One token from one row of logits (V,), computed in fp32."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.temperature <= 0:
        return int(logits.argmax())
    logits = filter_top_p(filter_top_k(logits / params.temperature, params.top_k), params.top_p)
    probs = logits.softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))
