"""How tensor parallelism splits each weight: the one table that training (DeepSpeed AutoTP's patterns), the
inference loader, the compressed loader, the universal checkpoint and the export all read.

Megatron's choices for a Llama block: column-parallel (split the output features, and their bias) for q/k/v and
gate/up, row-parallel (split the input features, all-reduce the output) for o and down. Inference also splits the
embedding and the head by vocabulary rows (equal chunks of ceil(V / tp), the last one shorter); training keeps them
whole (AutoTP leaves them replicated). Norms are replicated everywhere.

Pipeline stages: stage 0 holds the embedding, the last stage the final norm and the LM head (and the embedding
weights again when tied); layers are split evenly (earlier stages take the remainder) unless a split is listed.
"""

from __future__ import annotations

import re

import torch

from framework.cli import UserError
from framework.models.llama import Llama, ModelArgs

COLUMN = "column"
ROW = "row"
VOCAB = "vocab"

# the projection names each rule covers; AutoTP's patterns below are made from the same names
COLUMN_LINEARS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_LINEARS = ("o_proj", "down_proj")
VOCAB_TABLES = ("embed_tokens", "lm_head")

# DeepSpeed AutoTP's layer specs for training (regular expressions over our HF parameter names)
COLUMN_PARALLEL = r".*\.(" + "|".join(COLUMN_LINEARS) + r")\.(weight|bias)$"
ROW_PARALLEL = r".*\.(" + "|".join(ROW_LINEARS) + r")\.weight$"

SPLIT_DIM = {COLUMN: 0, ROW: 1, VOCAB: 0}


def tp_rule(name: str, vocab_parallel: bool = True) -> str | None:
    """COLUMN, ROW, VOCAB or None (replicated) for the tensor (or packed tensor: ``...q_proj.qweight``) ``name``.
    ``vocab_parallel`` False: training's layout, where the embedding and the head are whole on every rank."""
    parts = name.split(".")
    module, leaf = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", name)
    if module in COLUMN_LINEARS:
        return COLUMN
    if module in ROW_LINEARS:
        return ROW if leaf != "bias" else None  # a row-parallel bias is added once, after the all-reduce
    if vocab_parallel and module in VOCAB_TABLES:
        return VOCAB
    return None


def tp_partition_dim(name: str) -> int | None:
    """Which dim of training parameter ``name`` is split under tensor parallelism (None: replicated)."""
    if re.match(COLUMN_PARALLEL, name):
        return 0
    if re.match(ROW_PARALLEL, name):
        return 1
    return None


def vocab_chunk(vocab: int, tp: int) -> int:
    """Rows of a vocabulary-parallel table a rank holds (the last one may hold fewer): ceil(V / tp)."""
    return -(-vocab // tp)


def vocab_range(vocab: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """This rank's rows of a vocabulary-parallel table: equal chunks of ceil(V / tp), the last one shorter."""
    chunk = vocab_chunk(vocab, tp)
    return min(tp_rank * chunk, vocab), min((tp_rank + 1) * chunk, vocab)


def even_part(dim: int, size: int, tp: int, tp_rank: int) -> tuple[int, int, int]:
    """(dim, start, end) of rank ``tp_rank``'s equal part of ``size`` elements along ``dim``."""
    n = size // tp
    return dim, tp_rank * n, (tp_rank + 1) * n


def tp_slice(name: str, shape: tuple[int, ...], vocab: int, tp: int, tp_rank: int) -> tuple[int, int, int] | None:
    """(dim, start, end) of rank ``tp_rank``'s part of tensor ``name`` (of ``shape``) at inference, or None when
    every rank holds all of it: column-parallel by output rows, row-parallel by input columns, the vocabulary
    tables by ``vocab_range``."""
    rule = tp_rule(name)
    if rule == COLUMN:
        return even_part(0, shape[0], tp, tp_rank)
    if rule == ROW:
        return even_part(1, shape[1], tp, tp_rank)
    if rule == VOCAB:
        return (0, *vocab_range(vocab, tp, tp_rank))
    return None


def gather_tp(local: torch.Tensor, name: str, tp: int, tp_group) -> torch.Tensor:
    """The whole of a training parameter (or its optimizer moment) from every tensor-parallel rank's part
    (collective over ``tp_group``; a replicated one is returned as it is)."""
    dim = tp_partition_dim(name)
    if tp == 1 or dim is None:
        return local
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=tp_group)
    return torch.cat(parts, dim=dim)


# -- pipeline stages ---------------------------------------------------------------------------------------------
def check_stage_count(pp: int, n_layers: int) -> None:
    """The one check that a model of ``n_layers`` layers can be split into ``pp`` stages (UserError naming the fix)."""
    if pp < 1:
        raise UserError(f"infer.pp={pp}: use at least 1 stage")
    if pp > n_layers:
        raise UserError(f"infer.pp={pp} stages is more than the model's {n_layers} layers: use infer.pp <= {n_layers}")


def split_layers(n_layers: int, pp: int, split: list[int] | None) -> list[list[int]]:
    """Each stage's layer indices: ``split`` (one count per stage) or an even split, earlier stages taking the
    remainder. UserError naming the fix for a layout that does not fit the model."""
    check_stage_count(pp, n_layers)
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
