"""Evaluation: validation loss and perplexity, and exact-match accuracy on synthetic tasks.

Every rank runs the same evaluation (tensor-parallel and ZeRO-3 forwards are collective); rank 0 reports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.data.dataset import perplexity
from framework.data.synthetic import Example


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy, computed in fp32. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def validation_loss(model, blocks: torch.Tensor, batch_size: int, max_batches: int, device) -> float:
    losses = []
    for i in range(0, min(blocks.shape[0], batch_size * max_batches), batch_size):
        batch = blocks[i: i + batch_size].to(device)
        losses.append(lm_loss(model(batch[:, :-1]), batch[:, 1:]).item())
    return sum(losses) / max(1, len(losses))


@torch.no_grad()
def greedy_complete(model, prompt_ids: torch.Tensor, max_new: int, eos_id: int) -> torch.Tensor:
    """Greedy continuation of equal-length prompts (B, T) by full recompute; returns (B, max_new)."""
    ids = prompt_ids
    out = []
    for _ in range(max_new):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        ids = torch.cat([ids, nxt], dim=1)
    return torch.cat(out, dim=1)


@torch.no_grad()
def exact_match(model, tokenizer, examples: list[Example], limit: int, device) -> float:
    """Share of held-out prompts whose greedy completion equals the answer exactly (then EOS)."""
    examples = examples[:limit]
    if not examples:
        return float("nan")
    eos = tokenizer.eos_token_id
    # Bucket by prompt length so each batch needs no padding.
    buckets: dict[int, list[tuple[list[int], list[int]]]] = {}
    for ex in examples:
        p = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [eos]
        buckets.setdefault(len(p), []).append((p, a))
    correct = 0
    for items in buckets.values():
        prompts = torch.tensor([p for p, _ in items], device=device)
        max_new = max(len(a) for _, a in items)
        gen = greedy_complete(model, prompts, max_new, eos).tolist()
        correct += sum(g[: len(a)] == a for g, (_, a) in zip(gen, items))
    return correct / len(examples)


def evaluate(model, data, trainer_cfg, device) -> dict:
    was_training = model.training
    model.eval()
    loss = validation_loss(model, data.val, trainer_cfg.micro_batch_size, trainer_cfg.eval_batches, device)
    out = {"eval_loss": loss, "eval_ppl": perplexity(loss)}
    if data.eval_examples and trainer_cfg.eval_exact_match > 0:
        out["eval_exact_match"] = exact_match(model, data.tokenizer, data.eval_examples, trainer_cfg.eval_exact_match,
                                              device)
    if was_training:
        model.train()
    return out
