"""The stage plan: which layers (and bytes) each pipeline stage holds.

Stage 0 holds the embedding, the last stage the final norm and the LM head (and the embedding weights again
when tied); layers are split evenly (earlier stages take the remainder) unless ``infer.split`` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.cli import UserError
from framework.models.llama import Llama, ModelArgs


@dataclass
class Stage:
    index: int
    layers: list[int]
    first: bool
    last: bool
    tensor_names: list[str]
    bytes: int


def split_layers(n_layers: int, pp: int, split: list[int] | None) -> list[list[int]]:
    if pp < 1:
        raise UserError(f"infer.pp={pp}: use at least 1 stage")
    if pp > n_layers:
        raise UserError(f"infer.pp={pp} stages is more than the model's {n_layers} layers: use infer.pp <= {n_layers}")
    if split:
        split = list(split)
        if len(split) != pp:
            raise UserError(f"infer.split has {len(split)} entries for pp={pp} stages: give one count per stage")
        if sum(split) != n_layers or min(split) < 1:
            raise UserError(f"infer.split={split} must be positive counts adding up to the {n_layers} layers")
        counts = split
    else:
        base, extra = divmod(n_layers, pp)
        counts = [base + (1 if i < extra else 0) for i in range(pp)]
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def stage_tensor_names(args: ModelArgs, layers: list[int], first: bool, last: bool) -> list[str]:
    """Checkpoint tensor names a stage reads (a tied head reads model.embed_tokens.weight)."""
    with torch.device("meta"):
        model = Llama(args).keep_only(layers, first, last)
    return list(model.state_dict().keys())


def plan_stages(args: ModelArgs, pp: int, split: list[int] | None, bytes_per_el: int) -> list[Stage]:
    with torch.device("meta"):
        full = Llama(args)
    sizes = {k: v.numel() * bytes_per_el for k, v in full.state_dict().items()}
    stages = []
    for i, layers in enumerate(split_layers(args.n_layers, pp, split)):
        first, last = i == 0, i == pp - 1
        names = stage_tensor_names(args, layers, first, last)
        stages.append(Stage(i, layers, first, last, names, sum(sizes[n] for n in names)))
    return stages


def format_plan(stages: list[Stage]) -> str:
    lines = ["stage  layers        extra             weights"]
    for s in stages:
        extra = ",".join(x for x, on in (("embed", s.first), ("norm+head", s.last)) if on) or "-"
        span = f"{s.layers[0]}-{s.layers[-1]}" if s.layers else "-"
        lines.append(f"{s.index:>5}  {span:<12}  {extra:<16}  {s.bytes / 2**20:8.2f} MiB")
    return "\n".join(lines)
