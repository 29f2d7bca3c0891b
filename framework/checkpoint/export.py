"""Export, the hand-off to inference: the full model as Hugging Face sharded safetensors.

From a training engine (``export_from_module``) or from a checkpoint's per-parameter state with no engine at all
(``framework.checkpoint.convert``). Every rank takes part in gathering each tensor across its tensor-parallel
shards and ZeRO-3 partitions, but keeps only the tensors of the shard files it owns (shard i belongs to rank
i mod world) and writes them itself: no rank ever holds the whole model or any optimizer state. Rank 0 then
writes the index, config.json, generation_config.json, the tokenizer files and the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from framework.checkpoint.manifest import fsync_path, publish_dir, write_manifest
from framework.models.hf import to_hf_config
from framework.models.llama import Llama, ModelArgs
from framework.parallel.distributed import barrier
from framework.parallel.parallelize import tp_partition_dim

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_names_and_shapes(args: ModelArgs) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of an export in state-dict order (a tied model has no lm_head.weight), from a meta model."""
    with torch.device("meta"):
        model = Llama(args)
    out = []
    for name, t in model.state_dict().items():
        if args.tie_embeddings and name == "lm_head.weight":
            continue
        out.append((name, tuple(t.shape)))
    return out


def plan_shards(names_shapes, bytes_per_el: int, max_shard_bytes: int) -> list[list[str]]:
    shards, cur, cur_bytes = [], [], 0
    for name, shape in names_shapes:
        n = bytes_per_el
        for s in shape:
            n *= s
        if cur and cur_bytes + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += n
    if cur:
        shards.append(cur)
    return shards


def _full_tensor(param: torch.nn.Parameter, name: str, tp_group, tp: int) -> torch.Tensor:
    """Gather one parameter across ZeRO-3 partitions and tensor-parallel shards (collective on all ranks)."""
    if hasattr(param, "ds_id"):  # ZeRO-3 partitioned
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            local = param.detach().clone()
    else:
        local = param.detach()
    dim = tp_partition_dim(name)
    if tp > 1 and dim is not None:
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.contiguous(), group=tp_group)
        local = torch.cat(parts, dim=dim)
    return local.cpu()


def export_from_module(module: torch.nn.Module, args: ModelArgs, out_dir: str, tokenizer_dir: str | None,
                       tp: int = 1, tp_group=None, max_shard_mb: int = 2000, dtype: torch.dtype | None = None,
                       extra_manifest: dict | None = None) -> str:
    """Write ``out_dir`` from a (possibly TP-sharded, ZeRO-partitioned) model; every rank must call this."""
    params = dict(module.named_parameters())
    dtype = dtype or next(iter(params.values())).dtype
    return write_export(lambda name: _full_tensor(params[name], name, tp_group, tp), args, out_dir, tokenizer_dir,
                        max_shard_mb, dtype, extra_manifest)


def write_export(get_full: Callable[[str], torch.Tensor], args: ModelArgs, out_dir: str, tokenizer_dir: str | None,
                 max_shard_mb: int, dtype: torch.dtype, extra_manifest: dict | None = None) -> str:
    """Every rank calls ``get_full(name)`` for every tensor in the same order (it may be collective) and writes the
    shard files it owns into ``out_dir.tmp``; rank 0 adds the rest and swaps the directory into place (an earlier
    export stays whole until the new one replaces it)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    names_shapes = export_names_and_shapes(args)
    shards = plan_shards(names_shapes, torch.tensor([], dtype=dtype).element_size(), max_shard_mb * 2**20)
    n = len(shards)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    tmp_dir = out_dir.rstrip("/") + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
    barrier()
    weight_map = {}
    for i, names in enumerate(shards):
        owner = i % world
        tensors = {}
        for name in names:
            full = get_full(name)
            if rank == owner:
                tensors[name] = full.to(dtype).contiguous()
            weight_map[name] = files[i]
        if rank == owner:  # the writer fsyncs: on a shared filesystem another node cannot flush its cached writes
            save_file(tensors, os.path.join(tmp_dir, files[i]), metadata={"format": "pt"})
            fsync_path(os.path.join(tmp_dir, files[i]))
        del tensors
    barrier()
    if rank == 0:
        total = sum(torch.tensor([], dtype=dtype).element_size() * _numel(s) for _, s in names_shapes)
        with open(os.path.join(tmp_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        eos = pad = None
        if tokenizer_dir and os.path.isdir(tokenizer_dir):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer_dir)
            tok.save_pretrained(tmp_dir)
            eos, pad = tok.eos_token_id, tok.pad_token_id
        with open(os.path.join(tmp_dir, "config.json"), "w") as f:
            json.dump(to_hf_config(args, DTYPE_NAMES[dtype], eos, pad), f, indent=1)
        with open(os.path.join(tmp_dir, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": eos, "pad_token_id": pad, "do_sample": False}, f, indent=1)
        write_manifest(tmp_dir, extra_manifest)
        publish_dir(tmp_dir, out_dir)  # every file and directory fsynced, then swapped in
    barrier()
    return out_dir


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
