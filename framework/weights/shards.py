"""Writing sharded safetensors: the one shard planner, the shard file names and the index, shared by the export,
the per-parameter checkpoint state and the compressed export."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable

import torch

INDEX = "model.safetensors.index.json"


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Names in order, cut into shards of at most ``max_shard_bytes`` (a larger tensor gets a shard alone);
    ``sizes`` are (name, bytes) pairs. No names, no shards."""
    shards: list[list[str]] = []
    cur: list[str] = []
    cur_bytes = 0
    for name, nbytes in sizes:
        if cur and cur_bytes + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += nbytes
    if cur:
        shards.append(cur)
    return shards


def shape_bytes(shape: Iterable[int], element_bytes: int) -> int:
    """Bytes of a tensor of ``shape`` at ``element_bytes`` an element."""
    return element_bytes * math.prod(shape)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def tensor_sizes(tensors: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    """(name, bytes) of ``tensors`` in order: what ``plan_shards`` takes."""
    return [(name, tensor_bytes(t)) for name, t in tensors.items()]


def shard_name(i: int, n: int) -> str:
    """The file name of shard ``i`` (from 0) of ``n``: transformers' ``model-00001-of-00004.safetensors``."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def save_shard(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """One shard file (contiguous tensors; the metadata transformers expects)."""
    from safetensors.torch import save_file

    save_file({k: t.contiguous() for k, t in tensors.items()}, path, metadata={"format": "pt"})


def write_shards(directory: str, tensors: dict[str, torch.Tensor], shards: list[list[str]], first: int,
                 n: int) -> dict[str, str]:
    """Write ``shards`` (lists of names) as files ``first``.. of ``n`` into ``directory``; returns their weight map."""
    wmap = {}
    for i, names in enumerate(shards):
        fname = shard_name(first + i, n)
        save_shard(os.path.join(directory, fname), {k: tensors[k] for k in names})
        wmap.update({k: fname for k in names})
    return wmap


def write_index(directory: str, wmap: dict[str, str], metadata: dict, name: str = INDEX) -> None:
    """The index transformers reads: ``metadata`` (``total_size`` for a model) and the weight map."""
    with open(os.path.join(directory, name), "w") as f:
        json.dump({"metadata": metadata, "weight_map": wmap}, f, indent=1)
