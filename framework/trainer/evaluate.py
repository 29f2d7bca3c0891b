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


def lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """Summed next-token cross entropy in fp32, ``rows`` positions at a time: no fp32 copy of the whole (B, T, V)
    logits (at a 128K vocabulary that copy is 0.5 MB a token)."""
    flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for i in range(0, flat.shape[0], rows):
        total += F.cross_entropy(flat[i: i + rows].float(), tgt[i: i + rows], reduction="sum")
    return total


@torch.no_grad()
def validation_loss(model, blocks, batch_size: int, max_batches: int, device) -> tuple[float, float]:
    """(mean loss, token accuracy) over the counted targets of the first ``max_batches`` batches (document
    packing and loss masks as in training); the host reads them once, at the end."""
    from framework.data.packing import as_batch

    total = torch.zeros((), dtype=torch.float32, device=device)
    right = torch.zeros((), dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(0, min(blocks.shape[0], batch_size * max_batches), batch_size):
        batch = as_batch(blocks[i: i + batch_size]).to(device)
        logits, targets = model(batch.inputs, **batch.kwargs), batch.targets
        total += lm_loss_sum(logits, targets)
        counted = targets != -100
        right += ((logits.argmax(-1) == targets) & counted).sum()
        count += counted.sum()
    n = max(1, int(count.item()))
    return total.item() / n, right.item() / n


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
    loss, accuracy = validation_loss(model, data.val, trainer_cfg.micro_batch_size, trainer_cfg.eval_batches, device)
    out = {"eval_loss": loss, "eval_ppl": perplexity(loss), "eval_token_accuracy": accuracy}
    generate = not getattr(data, "fine_tuning", False) or trainer_cfg.eval_generate  # synthetic tasks: always
    if data.eval_examples and trainer_cfg.eval_exact_match > 0 and generate:
        out["eval_exact_match"] = exact_match(model, data.tokenizer, data.eval_examples, trainer_cfg.eval_exact_match,
                                              device)
    if was_training:
        model.train()
    return out
