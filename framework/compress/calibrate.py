"""Calibration for Wanda: token blocks from a data source, and the layer-by-layer pass that measures each linear
layer's inputs and prunes it.

The pass follows the Wanda paper: the calibration sequences are embedded once; then for each decoder layer in
order, hooks on its linear layers accumulate the sum of squares of every input feature over all calibration
tokens, the layer is pruned, and it is run again (pruned) to give the next layer its inputs. So each layer's
statistics are those of the already-pruned layers before it. Under ``torchrun`` each process is a pipeline
stage holding only its layers: stage 0 embeds the tokens, each stage collects its own layers' inputs, prunes
them and sends its output to the next (framework/compress/run.py).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from framework.cli import UserError
from framework.config import CalibConfig, DataConfig
from framework.models.llama import Llama, rope_cos_sin

DATA_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "configs", "data")


def calib_data_config(calib: CalibConfig, tokenizer_dir: str) -> DataConfig:
    """The DataConfig behind ``calib.data`` (a configs/data entry), reading the model's own tokenizer. Checks the
    source (files present, tokenizer present) without reading the corpus."""
    from omegaconf import OmegaConf

    from framework.data.sources import validate_data_config

    if not calib.data:
        raise UserError("method=wanda needs calibration data: set calib.data (stdlib, synthetic, or files with "
                        "calib.paths=[a.txt])")
    path = os.path.join(DATA_CONFIG_DIR, f"{calib.data}.yaml")
    if not os.path.isfile(path):
        names = sorted(f[:-5] for f in os.listdir(DATA_CONFIG_DIR) if f.endswith(".yaml"))
        raise UserError(f"calib.data={calib.data}: no such data config; available: {', '.join(names)}")
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(path))
    cfg: DataConfig = OmegaConf.to_object(merged)
    cfg.tokenizer = tokenizer_dir
    cfg.max_chars = calib.max_chars
    if calib.paths:
        cfg.paths = list(calib.paths)
    if cfg.source == "files" and not cfg.paths:
        raise UserError("calib.data=files needs calib.paths=[file.txt, ...]: the calibration text is missing")
    if calib.samples < 1 or calib.seq_len < 2:
        raise UserError(f"calib.samples={calib.samples}, calib.seq_len={calib.seq_len}: use at least 1 and 2")
    validate_data_config(cfg)
    return cfg


def calibration_blocks(calib: CalibConfig, tokenizer_dir: str) -> torch.Tensor:
    """(samples, seq_len) token ids drawn (seeded) from the packed corpus."""
    import datasets

    from framework.data.dataset import tokenize_and_pack
    from framework.data.sources import load_corpus
    from framework.data.tokenizer import load_tokenizer

    datasets.disable_progress_bars()
    cfg = calib_data_config(calib, tokenizer_dir)
    texts, _ = load_corpus(cfg, calib.seed)
    blocks = tokenize_and_pack(texts, load_tokenizer(tokenizer_dir), calib.seq_len - 1, cfg.num_proc)
    if blocks.shape[0] == 0:
        raise UserError(f"calib.data={calib.data} holds less than one block of {calib.seq_len} tokens: "
                        f"add text or lower calib.seq_len")
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(calib.seed))
    return blocks[order[: calib.samples]]


def accumulate_sq(sq: dict[str, torch.Tensor], name: str):
    """A forward hook adding the squares of every input feature of a linear layer into ``sq[name]``."""

    def hook(mod: nn.Module, inputs, output):
        x = inputs[0].detach().float()
        sq[name] += x.reshape(-1, x.shape[-1]).pow(2).sum(0)

    return hook


@torch.no_grad()
def wanda_prune_layers(model: Llama, hidden: torch.Tensor, sparsity, batch_size: int = 8) -> torch.Tensor:
    """Prune the decoder layers ``model`` holds (the whole model, or one pipeline stage's) in order with Wanda,
    fed ``hidden`` (S, T, D): the calibration tokens' embeddings, or the previous stage's output. Returns this
    stage's output for the same tokens, computed through the pruned layers."""
    from framework.compress.prune import prunable_linears, wanda_prune_layer

    xs = list(hidden.split(batch_size))  # each (b, T, D)
    T = hidden.shape[1]
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(T)[None], hidden.dtype)  # (1, T, hd)
    for layer in model.model.layers.values():
        linears = prunable_linears(layer)
        sq = {name: torch.zeros(lin.in_features) for name, lin in linears}
        hooks = [lin.register_forward_hook(accumulate_sq(sq, name)) for name, lin in linears]
        try:
            for x in xs:
                layer(x, cos, sin)
        finally:
            for h in hooks:
                h.remove()
        wanda_prune_layer(linears, sq, sparsity)
        xs = [layer(x, cos, sin) for x in xs]  # the next layer sees this one pruned
    return torch.cat(xs)
