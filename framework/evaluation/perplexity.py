"""Held-out token perplexity of any model directory, through the inference engine's loader.

The corpus is tokenized with the model's own tokenizer and packed and split exactly as training does
(``framework.data.dataset.prepare_data``): with training's data keys, ``seq_len`` and seed, the scored blocks
are training's validation blocks. The model is loaded as one pipeline stage by ``framework.infer.loader``
(compressed exports included, ``quant`` quantizes while loading) and scored with the engine's
``forward_logits`` (causal, no cache).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time

import torch
import torch.nn.functional as F

from framework.cli import UserError
from framework.config import DataConfig, EvalConfig


def held_out_blocks(data: DataConfig, tokenizer_dir: str, seq_len: int, seed: int, cache_dir: str | None) -> torch.Tensor:
    """(M, seq_len + 1) held-out token blocks of ``data`` under the tokenizer in ``tokenizer_dir``."""
    from framework.data.dataset import prepare_data

    dc = dataclasses.replace(data, tokenizer=tokenizer_dir)
    tmp = None
    if cache_dir is None:
        tmp = cache_dir = tempfile.mkdtemp(prefix="miaotui-eval-")
    try:
        return prepare_data(dc, seq_len, seed, cache_dir, is_rank0=True).val
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def score_blocks(weights, blocks: torch.Tensor, batch_size: int, max_batches: int = 0) -> tuple[float, int]:
    """(mean next-token negative log-likelihood in nats, tokens scored) of ``blocks`` (M, T + 1)."""
    from framework.infer.worker import forward_logits

    total, count = 0.0, 0
    for i, batch in enumerate(blocks.split(batch_size)):
        if max_batches and i >= max_batches:
            break
        logits = forward_logits(weights, batch[:, :-1])  # (B, T, V)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return total / max(count, 1), count


def load_for_eval(model_dir: str, dtype_name: str, quant: str | None = None, group_size: int = 128):
    """(the whole model as one stage of the engine, its ModelArgs), on CPU."""
    from framework.infer.loader import load_stage, read_model_args
    from framework.infer.plan import plan_stages
    from framework.weights.dtypes import torch_dtype

    dtype = torch_dtype(dtype_name, "dtype")
    if quant not in (None, "int8", "int4"):
        raise UserError(f"quant={quant}: use int8 or int4 (or leave it unset)")
    args = read_model_args(model_dir)
    stage = plan_stages(args, 1, None, torch.tensor([], dtype=dtype).element_size())[0]
    weights = load_stage(model_dir, args, stage, torch.device("cpu"), dtype, quant=quant, group_size=group_size)
    return weights, args


def evaluate(cfg: EvalConfig) -> dict:
    """Score ``cfg.model_dir`` on the held-out blocks of ``cfg.data``; print and (with ``output``) write JSON."""
    from framework.checkpoint.resolve import resolve_export_dir
    from framework.data.sources import validate_data_config

    t0 = time.perf_counter()
    path = resolve_export_dir(cfg.model_dir)
    tokenizer_dir = cfg.data.tokenizer or path
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        raise UserError(f"no tokenizer.json in {tokenizer_dir}: set data.tokenizer=<a tokenizer directory>")
    validate_data_config(dataclasses.replace(cfg.data, tokenizer=tokenizer_dir))
    if cfg.seq_len < 2 or cfg.batch_size < 1:
        raise UserError(f"seq_len={cfg.seq_len}, batch_size={cfg.batch_size}: use seq_len >= 2 and batch_size >= 1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    weights, args = load_for_eval(path, cfg.dtype, cfg.quant, cfg.quant_group_size)
    blocks = held_out_blocks(cfg.data, tokenizer_dir, cfg.seq_len, cfg.seed, cfg.cache_dir)
    if int(blocks.max()) >= args.vocab_size:
        raise UserError(f"the tokenizer in {tokenizer_dir} yields ids beyond the model's {args.vocab_size} tokens: "
                        f"point data.tokenizer at the model's tokenizer")
    loss, tokens = score_blocks(weights, blocks, cfg.batch_size, cfg.max_batches)
    result = {"model_dir": os.path.abspath(path), "data": cfg.data.source, "seq_len": cfg.seq_len,
              "tokens": tokens, "loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 50.0)), 4),
              "dtype": cfg.dtype, "quant": cfg.quant, "seconds": round(time.perf_counter() - t0, 2)}
    print(f"held-out {cfg.data.source}: {tokens} tokens, loss {loss:.4f} nats, perplexity {result['perplexity']:.3f}",
          flush=True)
    if cfg.output:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
        with open(cfg.output, "w") as f:
            json.dump(result, f, indent=1)
    return result
