"""Pruning: magnitude and Wanda, unstructured or N:M (2:4), on the linear layers of the decoder layers.

- **magnitude**: score ``|W|``; unstructured ratios compare all weights of a matrix (the Wanda paper's baseline),
  N:M keeps the N largest of every M consecutive input weights of a row.
- **Wanda** (Sun et al. 2023): score ``|W_ij| * ||X_j||_2``, the weight times the L2 norm of its input feature
  over the calibration tokens, compared within each output row (unstructured) or each group of M (N:M). Layers
  are pruned in order, each one's inputs computed through the layers already pruned before it
  (``framework/compress/calibrate.py``).

The embedding and the LM head are never pruned. The result is dense: zeros in the weights. On CPU that saves
nothing at run time (dense kernels multiply the zeros too); on CUDA a 2:4 model can run PyTorch's semi-structured
sparse kernels (``apply_semi_structured``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from framework.cli import UserError

METHODS = ("magnitude", "wanda")
PRUNED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Sparsity:
    """An unstructured ratio (``n_m`` None) or an N:M pattern (N kept of every M; ratio 1 - N/M)."""

    ratio: float
    n_m: tuple[int, int] | None = None

    def __str__(self) -> str:
        return f"{self.n_m[0]}:{self.n_m[1]}" if self.n_m else f"{self.ratio:g}"


def parse_sparsity(value) -> Sparsity:
    """``0.5`` (a ratio strictly between 0 and 1) or ``"2:4"`` (N:M with 0 < N < M). UserError otherwise."""
    text = str(value).strip() if value is not None else ""
    if ":" in text:
        m = re.fullmatch(r"(\d+):(\d+)", text)
        if not m or not 0 < int(m.group(1)) < int(m.group(2)):
            raise UserError(f"sparsity={text} is not a valid N:M pattern: use N:M with 0 < N < M, e.g. 2:4")
        n, mm = int(m.group(1)), int(m.group(2))
        return Sparsity(1.0 - n / mm, (n, mm))
    try:
        ratio = float(text)
    except ValueError:
        raise UserError(f"sparsity={text or None}: give a ratio in (0, 1) such as 0.5, or an N:M pattern such as 2:4") from None
    if not 0.0 < ratio < 1.0:
        raise UserError(f"sparsity={text} is outside (0, 1): give the share of weights to zero, e.g. 0.5")
    return Sparsity(ratio)


def prunable_linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of the decoder layers' linear layers under ``module``."""
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, nn.Linear) and n.split(".")[-1] in PRUNED_LINEARS]


def check_n_m(model: nn.Module, sparsity: Sparsity) -> None:
    if sparsity.n_m is None:
        return
    m = sparsity.n_m[1]
    for name, lin in prunable_linears(model):
        if lin.in_features % m:
            raise UserError(f"sparsity={sparsity}: {name} has {lin.in_features} input features, not a multiple of {m}")


def prune_mask(score: torch.Tensor, sparsity: Sparsity, per_row: bool) -> torch.Tensor:
    """Boolean (out, in) mask of the weights to zero: the lowest scores of each row (``per_row``) or of the whole
    matrix, or of each group of M consecutive inputs for N:M."""
    out_f, in_f = score.shape
    if sparsity.n_m is not None:
        n, m = sparsity.n_m
        groups = score.reshape(out_f, in_f // m, m)
        drop = groups.topk(m - n, dim=-1, largest=False).indices  # (out, in/m, m-n)
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
        return mask.reshape(out_f, in_f)
    if per_row:
        k = int(in_f * sparsity.ratio)
        drop = score.topk(k, dim=1, largest=False).indices
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, drop, True)
    k = int(score.numel() * sparsity.ratio)
    drop = score.flatten().topk(k, largest=False).indices
    return torch.zeros(score.numel(), dtype=torch.bool, device=score.device).scatter_(0, drop, True).view_as(score)


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: Sparsity) -> int:
    """Zero the smallest weights of every decoder linear layer; returns how many layers."""
    layers = prunable_linears(model)
    for _, lin in layers:
        lin.weight[prune_mask(lin.weight.abs().float(), sparsity, per_row=False)] = 0
    return len(layers)


@torch.no_grad()
def wanda_prune_layer(linears: list[tuple[str, nn.Linear]], input_sq: dict[str, torch.Tensor], sparsity: Sparsity) -> None:
    """Prune each linear by |W| x the L2 norm of its inputs (``input_sq``: the sum of squares per input feature)."""
    for name, lin in linears:
        score = lin.weight.abs().float() * input_sq[name].sqrt()[None, :]  # (out, in)
        lin.weight[prune_mask(score, sparsity, per_row=True)] = 0


def measured_sparsity(model: nn.Module) -> float:
    """Share of zeros over the prunable weights."""
    zeros = total = 0
    for _, lin in prunable_linears(model):
        zeros += int((lin.weight == 0).sum())
        total += lin.weight.numel()
    return zeros / max(total, 1)


def is_n_m(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of m consecutive inputs of every row has at most n nonzeros."""
    out_f, in_f = weight.shape
    if in_f % m:
        return False
    return bool(((weight.reshape(out_f, -1, m) != 0).sum(-1) <= n).all())


@torch.no_grad()
def apply_semi_structured(model: nn.Module) -> int:
    """CUDA only: turn every 2:4-sparse linear weight (fp16/bf16) under ``model`` into PyTorch's semi-structured
    sparse tensor, so ``F.linear`` runs the sparse kernels (cuSPARSELt or CUTLASS). Works on the model or on the
    engine's fused stage weights (a q|k|v concatenation of 2:4 rows is 2:4). PyTorch's rules: compute capability
    8.0 or more, fp16/bf16 (or int8) weights, both dimensions multiples of 64; other layers, the head and shared
    weights stay dense. Returns how many were converted."""
    from torch.sparse import to_sparse_semi_structured

    n = 0
    for name, lin in list(model.named_modules()):
        if type(lin) is not nn.Linear or name.split(".")[-1] == "lm_head":
            continue
        w = lin.weight
        if w.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16):
            continue
        if w.shape[0] % 64 or w.shape[1] % 64 or not is_n_m(w):
            continue
        lin.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
        n += 1
    return n
