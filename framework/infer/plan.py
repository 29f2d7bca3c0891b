"""The stage plan: which layers (and bytes) each pipeline stage holds.

Stage 0 holds the embedding, the last stage the final norm and the LM head (and the embedding weights again
when tied); layers are split evenly (earlier stages take the remainder) unless ``infer.split`` lists them
(``framework.weights.layout.split_layers``, the one check of a split against the model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.models.llama import Llama, ModelArgs
from framework.weights.layout import split_layers, stage_tensor_names


@dataclass
class Stage:
    index: int
    layers: list[int]
    first: bool
    last: bool
    tensor_names: list[str]
    bytes: int


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
