"""Distillation (``trainer.distill_from=<target export>``): train a small model, a draft for speculative decoding,
to match a frozen target's next-token distributions.

The target is loaded whole on every rank, in the training precision, frozen and in eval mode, and runs forward on
the same micro-batch as the student inside the training step: no logits are stored or exchanged, so it works at
any dp (each data-parallel rank distils on its own shard of the batch) and at tp (each rank of a tensor-parallel
group runs the same batch; the student's logits are whole on every rank). The loss is the forward KL divergence
KL(target || student) per counted position, summed and divided like the cross entropy it replaces (the mean over
counted targets, or over the global batch's count where rows count selectively), so gradient accumulation, loss
masks and packing mean the same thing. The student trains on the target's tokenizer (the data is tokenized with
it), so its ids are the target's and ``infer.speculative=draft`` accepts it.

Why forward KL: it is what a draft needs. A draft's tokens are kept where they are the target's likeliest (greedy)
or coincide with its draw (sampled); matching the target's whole distribution, mass where the target puts mass,
raises both (DistillSpec, Zhou et al. 2023, finds forward KL and total variation best for acceptance on most
tasks).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from framework.cli import UserError
from framework.trainer.loss import IGNORE_INDEX


def with_distill_from(cfg):
    """``trainer.distill_from``: the data is tokenized with the target's tokenizer unless ``data.tokenizer`` names
    one with exactly the target's vocabulary. ``cfg`` is a TrainConfig; returns it, maybe with data.tokenizer set."""
    src = cfg.trainer.distill_from
    if not src:
        return cfg
    from framework.data.tokenizer import load_tokenizer
    from framework.models.hf import has_tokenizer

    target_dir = resolve_target_dir(src)
    if cfg.data.tokenizer is None:
        if not has_tokenizer(target_dir):
            raise UserError(f"trainer.distill_from={src} has no tokenizer files: point it at an export (its export/ "
                            "holds the tokenizer)")
        return replace(cfg, data=replace(cfg.data, tokenizer=target_dir))
    if load_tokenizer(cfg.data.tokenizer).get_vocab() != load_tokenizer(target_dir).get_vocab():
        raise UserError(f"data.tokenizer={cfg.data.tokenizer} is not the tokenizer of trainer.distill_from={src}: a "
                        "draft must share the target's ids (leave data.tokenizer unset)")
    return cfg


def resolve_target_dir(src: str) -> str:
    """The export directory of ``trainer.distill_from`` (an export, or a run directory with export/)."""
    from framework.checkpoint.resolve import resolve_export_dir

    return resolve_export_dir(src, key="trainer.distill_from")


class Distiller:
    """The frozen target and the distillation loss."""

    def __init__(self, target: torch.nn.Module):
        self.target = target.eval().requires_grad_(False)

    @torch.no_grad()
    def target_logits(self, inputs: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.target(inputs, **kwargs)

    def loss(self, student_logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
             divisor: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """KL(target || student) summed over the counted positions (targets != -100), divided by ``divisor`` or
        by their count. student_logits (B, T, V), inputs and targets (B, T); kwargs go to the target's forward."""
        return kl_to_target(student_logits, self.target_logits(inputs, **kwargs), targets, divisor)


def kl_to_target(student_logits: torch.Tensor, target_logits: torch.Tensor, targets: torch.Tensor,
                 divisor: torch.Tensor | None = None, chunk: int = 2048) -> torch.Tensor:
    """Forward KL per position, in fp32, ``chunk`` positions at a time (one chunk's fp32 copy of the vocabulary at
    once in the forward). A target whose vocabulary is padded past the student's is compared on the shared ids."""
    v = min(student_logits.shape[-1], target_logits.shape[-1])
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = target_logits.reshape(-1, target_logits.shape[-1])
    valid = (targets.reshape(-1) != IGNORE_INDEX).float()
    total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
    for i in range(0, s.shape[0], chunk):
        log_q = F.log_softmax(s[i: i + chunk, :v].float(), dim=-1)  # (c, v) the student's
        log_p = F.log_softmax(t[i: i + chunk, :v].float(), dim=-1)  # the target's
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (c,)
        total = total + (kl * valid[i: i + chunk]).sum()
    return total / (valid.sum() if divisor is None else divisor)


def build_distiller(cfg, device: torch.device, dtype: torch.dtype, student_vocab: int) -> Distiller | None:
    """The frozen target of ``trainer.distill_from`` on this rank (None without it)."""
    src = cfg.trainer.distill_from
    if not src:
        return None
    from framework.models.hf import from_hf_config, read_hf_config
    from framework.parallel.materialize import build_in_dtype
    from framework.weights.io import load_hf_weights

    target_dir = resolve_target_dir(src)
    args = from_hf_config(read_hf_config(target_dir), name="distill-target")
    if args.vocab_size < student_vocab:
        raise UserError(f"trainer.distill_from={src} has {args.vocab_size} vocabulary rows, fewer than the student's "
                        f"{student_vocab}: train the student on the target's tokenizer (leave data.tokenizer unset)")
    if cfg.trainer.seq_len > args.max_seq_len:
        raise UserError(f"trainer.seq_len={cfg.trainer.seq_len} exceeds the context of {args.max_seq_len} tokens of "
                        f"trainer.distill_from={src}: lower trainer.seq_len")
    target = build_in_dtype(args, device, dtype, seed=0)
    load_hf_weights(target, target_dir)
    return Distiller(target)
