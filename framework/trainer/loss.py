"""The training loss: next-token cross entropy over chunks of positions, never the whole (B, T, V) logits in fp32.

``F.cross_entropy(logits.float(), ...)`` makes an fp32 copy of the logits for the forward, keeps the fp32
log-softmax for the backward and makes an fp32 gradient: three (B, T, V) fp32 tensors, 1.5 MB a token at a 128K
vocabulary. ``chunked_cross_entropy`` computes the same mean in fp32 over ``chunk`` positions at a time: its forward
keeps one fp32 log-sum-exp per position, its backward recomputes each chunk's softmax in fp32 and writes the
gradient straight into a tensor of the logits' dtype. The values are those of the fp32 reference (each position's
loss is computed in fp32 exactly as F.cross_entropy does; only the order of the final sum differs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # F.cross_entropy's default: targets equal to it add nothing and are not counted


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int, divisor: torch.Tensor | None) -> torch.Tensor:
        # logits (N, V) any float dtype, targets (N,) int64
        n = logits.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)  # (N,) log-sum-exp of each position
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        valid = targets != IGNORE_INDEX
        safe = targets.clamp(min=0)
        for i in range(0, n, chunk):
            part = logits[i: i + chunk].float()  # (c, V): the only fp32 copy, one chunk at a time
            lse[i: i + chunk] = torch.logsumexp(part, dim=-1)
            picked = part.gather(1, safe[i: i + chunk, None])[:, 0]
            total += ((lse[i: i + chunk] - picked) * valid[i: i + chunk]).sum()
        count = valid.sum() if divisor is None else divisor
        ctx.save_for_backward(logits, targets, lse, count)
        ctx.chunk = chunk
        return total / count  # nan when every target is ignored (and no divisor given), as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, lse, count = ctx.saved_tensors
        grad = torch.empty_like(logits)  # (N, V) in the logits' dtype
        scale = grad_out.float() / count
        valid = targets != IGNORE_INDEX
        safe = targets.clamp(min=0)
        for i in range(0, logits.shape[0], ctx.chunk):
            part = logits[i: i + ctx.chunk].float()
            g = torch.exp(part - lse[i: i + ctx.chunk, None])  # softmax, (c, V) fp32
            g.scatter_add_(1, safe[i: i + ctx.chunk, None], -torch.ones_like(g[:, :1]))  # minus the one-hot target
            g *= (scale * valid[i: i + ctx.chunk])[:, None]
            grad[i: i + ctx.chunk] = g.to(grad.dtype)
        return grad, None, None, None


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 4096,
                          divisor: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross entropy in fp32 over ``chunk`` positions at a time (forward and backward): the value
    and gradient of ``F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1))`` without an fp32 copy of
    the whole logits. logits (..., V), targets (...) int64; targets of -100 are ignored. ``divisor`` (a scalar
    tensor) replaces the count of targets: the summed loss over it."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: at least one position a chunk")
    flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if not torch.is_grad_enabled() or not logits.requires_grad:
        # no backward to serve: the same chunks, through the reference function, summed
        valid = tgt != IGNORE_INDEX
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for i in range(0, flat.shape[0], chunk):
            total += F.cross_entropy(flat[i: i + chunk].float(), tgt[i: i + chunk], reduction="sum")
        return total / (valid.sum() if divisor is None else divisor)
    return _ChunkedCrossEntropy.apply(flat, tgt, chunk, divisor)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss: next-token cross entropy, in fp32, chunked; the mean over the counted targets, or their
    sum over ``divisor``. logits (B, T, V), targets (B, T)."""
    return chunked_cross_entropy(logits, targets, divisor=divisor)


def global_divisor(targets: torch.Tensor, gas: int, group=None) -> torch.Tensor | None:
    """What each micro-batch's summed loss is divided by so that the step's gradient is that of the mean over the
    counted targets of the whole global batch, not a mean of per-micro-batch means: DeepSpeed divides each micro
    loss by the accumulation steps and averages the gradients over dp, so a micro loss of sum / (N_global / (gas x
    dp)) gives sum_all / N_global. N_global is all-reduced over the world and divided by the ranks that share a
    batch (tensor parallelism); ``targets`` are this rank's (B, T) with -100 not counted. (Where every target
    counts, every micro-batch counts as many and the plain mean is already that: the trainer then skips this.)"""
    import torch.distributed as dist

    counted = (targets != IGNORE_INDEX).sum().float()
    if not dist.is_initialized():
        return counted / gas
    dist.all_reduce(counted, group=group)  # summed over dp x tp ranks: tp times N_global
    return counted / (dist.get_world_size(group) * gas)  # tp N_global / (tp dp gas) = N_global / (gas dp)
