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

from framework.checkpoint.manifest import fsync_path, publish_dir, write_manifest
from framework.models.hf import to_hf_config
from framework.models.llama import Llama, ModelArgs
from framework.parallel.distributed import barrier
from framework.weights import shards as sh
from framework.weights.dtypes import hf_name
from framework.weights.layout import gather_tp

__all__ = ["export_from_module", "export_names_and_shapes", "write_export"]


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


def _full_tensor(param: torch.nn.Parameter, name: str, tp_group, tp: int) -> torch.Tensor:
    """Gather one parameter across ZeRO-3 partitions and tensor-parallel shards (collective on all ranks)."""
    if hasattr(param, "ds_id"):  # ZeRO-3 partitioned
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            local = param.detach().clone()
    else:
        local = param.detach()
    return gather_tp(local, name, tp, tp_group).cpu()


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
    el = torch.tensor([], dtype=dtype).element_size()
    sizes = [(name, sh.shape_bytes(shape, el)) for name, shape in names_shapes]
    shards = sh.plan_shards(sizes, max_shard_mb * 2**20)
    files = [sh.shard_name(i, len(shards)) for i in range(len(shards))]
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
            sh.save_shard(os.path.join(tmp_dir, files[i]), tensors)
            fsync_path(os.path.join(tmp_dir, files[i]))
        del tensors
    barrier()
    if rank == 0:
        sh.write_index(tmp_dir, weight_map, {"total_size": sum(b for _, b in sizes)})
        eos = pad = None
        if tokenizer_dir and os.path.isdir(tokenizer_dir):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer_dir)
            tok.save_pretrained(tmp_dir)
            eos, pad = tok.eos_token_id, tok.pad_token_id
        with open(os.path.join(tmp_dir, "config.json"), "w") as f:
            json.dump(to_hf_config(args, hf_name(dtype), eos, pad), f, indent=1)
        with open(os.path.join(tmp_dir, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": eos, "pad_token_id": pad, "do_sample": False}, f, indent=1)
        write_manifest(tmp_dir, extra_manifest)
        publish_dir(tmp_dir, out_dir)  # every file and directory fsynced, then swapped in
    barrier()
    return out_dir

