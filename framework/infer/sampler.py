"""Sampling on the device, batched: one call turns a step's logits into token ids.

Per-row parameters live in slot-indexed tensors (set when a sequence is admitted), so rows with different
temperatures, top-k, top-p and repetition penalties share one batched computation, in the order transformers
applies them: repetition penalty, temperature, top-k, top-p.

Seeded sampling without generators: a row draws its token by the Gumbel-max trick, argmax(logits / T + g), with
the noise g computed by a counter-based hash of (seed, position of the token, vocabulary id). The noise of a
request therefore depends on nothing else in its batch, nor on the number of stages, and needs no per-row
``torch.Generator`` (whose draws would have to run row by row on the host).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


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
    logprobs: int | None = None
    """Return each generated token's log-probability with this many most likely alternatives (0: none of them)."""
    prompt_logprobs: int | None = None
    """The same for every prompt token after the first, scored in the prefill steps themselves (echo, lm-eval)."""

    @property
    def top_logprobs(self) -> int:
        """Alternatives the last stage returns for this row's scored tokens (-1: it scores none)."""
        return max(-1 if self.logprobs is None else self.logprobs,
                   -1 if self.prompt_logprobs is None else self.prompt_logprobs)


MAX_LOGPROBS = 20  # most alternatives a token can ask for (OpenAI's top_logprobs bound)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Rows (n, 1 + 2k) int64 for logits (n, V) and the tokens that followed (n,): the target's log-probability,
    then the k most likely ids and their log-probabilities, floats carried as their fp32 bits so the row travels
    in the int64 reply the ring already returns. Log-probabilities are the model's own (before temperature, top-k,
    top-p and the repetition penalty), as OpenAI's and vLLM's are."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    cols = [lp.gather(-1, targets[:, None].clamp(min=0))]  # (n, 1)
    ids = None
    if k > 0:
        top, ids = lp.topk(k, dim=-1)  # (n, k), most likely first
        cols.append(top)
    bits = torch.cat(cols, dim=-1).contiguous().view(torch.int32).to(torch.int64)  # (n, 1 [+ k])
    if ids is None:
        return bits
    return torch.cat([bits[:, :1], torch.stack([ids, bits[:, 1:]], dim=-1).flatten(1)], dim=-1)


def unpack_logprobs(values: list[int], k: int) -> tuple[float, list[tuple[int, float]]]:
    """One row of ``token_logprobs`` read back on the host: (log-probability, [(id, log-probability)] * k)."""
    def f(bits: int) -> float:
        return struct.unpack("<f", struct.pack("<i", bits))[0]

    return f(values[0]), [(values[1 + 2 * j], f(values[2 + 2 * j])) for j in range(k)]


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 values in [0, 2^32); every product stays below 2^63."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise (n, V) from a hash of (seed, position, token id), in fp32."""
    row = _mix32((_mix32(seeds & _M32) + (positions & _M32) * 0x9E3779B1) & _M32)  # (n,)
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _mix32((row[:, None] + ids[None, :] * 0x27D4EB2D) & _M32)  # (n, V)
    u = (bits.double() + 0.5) / 2.0**32  # in (0, 1), never 0 or 1
    return (-torch.log(-torch.log(u))).float()


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' rule: a seen token's positive logit is divided by the penalty, a negative one multiplied.
    logits (n, V), seen (n, V) bool, penalty (n,)."""
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """-inf outside each row's top-k (k <= 0: all) and outside the smallest set reaching top_p (>= 1: all)."""
    V = logits.shape[-1]
    sorted_logits, idx = logits.sort(-1, descending=True)
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where((top_k <= 0) | (top_k > V), V, top_k)[:, None]
    drop = rank >= k
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(-1)
    # a token goes when the tokens before it already reach p (the first always stays)
    drop_p = ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p < 1.0)[:, None] & (rank > 0)
    drop = torch.zeros_like(drop).scatter(-1, idx, drop | drop_p)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Token ids (n,) from logits (n, V) in fp32: argmax where temperature <= 0, else a seeded draw."""
    greedy = logits.argmax(-1)
    sampling = temperature > 0
    t = torch.where(sampling, temperature, 1.0)[:, None]
    filtered = filter_top_k_top_p(logits / t, top_k, top_p)
    drawn = (filtered + gumbel_noise(seeds, positions, logits.shape[-1])).argmax(-1)
    return torch.where(sampling, drawn, greedy)


class Sampler:
    """The last stage's sampler: per-slot parameters and, for the repetition penalty, the tokens each slot saw."""

    def __init__(self, n_slots: int, vocab: int, device: torch.device):
        n = n_slots + 1  # + the scratch slot
        self.vocab, self.device = vocab, device
        self.temperature = torch.zeros(n, device=device)
        self.top_k = torch.zeros(n, dtype=torch.long, device=device)
        self.top_p = torch.ones(n, device=device)
        self.penalty = torch.ones(n, device=device)
        self.seed = torch.zeros(n, dtype=torch.long, device=device)
        self.seen: torch.Tensor | None = None  # (n, V) bool, made when a row first asks for a penalty
        self.top_logprobs = [-1] * n  # host side: alternatives each slot's scored tokens return (-1: none)
        self.any_sampling = False

    def admit(self, slots: list[int], params: list[tuple[float, int, float, float, int, int]]) -> None:
        """New sequences take their slots: (temperature, top_k, top_p, repetition_penalty, seed, top logprobs)
        each."""
        if not slots:
            return
        idx = torch.tensor(slots, device=self.device)
        t, k, p, r, s, lp = (list(c) for c in zip(*params))
        for slot, n in zip(slots, lp):
            self.top_logprobs[slot] = n
        self.temperature[idx] = torch.tensor(t, device=self.device)
        self.top_k[idx] = torch.tensor(k, dtype=torch.long, device=self.device)
        self.top_p[idx] = torch.tensor(p, device=self.device)
        self.penalty[idx] = torch.tensor(r, device=self.device)
        self.seed[idx] = torch.tensor(s, dtype=torch.long, device=self.device)
        self.any_sampling |= any(x > 0 for x in t)
        if any(x != 1.0 for x in r) and self.seen is None:
            self.seen = torch.zeros(self.temperature.shape[0], self.vocab, dtype=torch.bool, device=self.device)
        if self.seen is not None:
            self.seen[idx] = False

    def observe(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Record the step's input tokens (prompt chunks and last sampled ids) for the repetition penalty."""
        if self.seen is not None and tokens.numel():
            self.seen[slots, tokens] = True

    def __call__(self, logits: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token ids (n,) on the device for logits (n, V) of rows in ``slots`` sampling position ``positions``."""
        logits = logits.float()
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen[slots], self.penalty[slots])
        if not self.any_sampling:
            return logits.argmax(-1)
        return sample(logits, self.temperature[slots], self.top_k[slots], self.top_p[slots], self.seed[slots],
                      positions)
