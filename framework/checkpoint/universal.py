"""Layout-free training state: every parameter's full fp32 value and AdamW moments, one tensor per name.

DeepSpeed's own shards (``mp_rank_*``, ``*_optim_states.pt``) are bound to the (dp, tp, ZeRO stage) that wrote them.
Every checkpoint holds ``universal/`` instead (DeepSpeed's shards too only for fp16, or with
``checkpoint.universal=false``): for each parameter (by its Hugging Face name) the
full fp32 master weight and the ``exp_avg`` / ``exp_avg_sq`` moments, gathered across ZeRO partitions and
tensor-parallel shards, in safetensors files written in parallel (file i by rank i mod world) and indexed by
``model.safetensors.index.json``. Any layout, the saving one included, resumes from it by slicing what it owns
(the same values bit for bit: fp32 masters and moments); the export reads it with no DeepSpeed engine at all.

Why our own format rather than DeepSpeed's universal checkpoint: that one is produced by an offline conversion
(``ds_to_universal``) run after the fact, and its tensor-parallel slicing rules target Megatron layouts. Ours is
written at save time, so a checkpoint is resumable on any layout the moment ``latest`` moves, and the same files
serve the export and inference.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from framework.cli import UserError
from framework.parallel.deepspeed_hooks import has_fp32_master, inner_optimizer, relink_optimizer_state
from framework.weights.io import read_part
from framework.weights.layout import even_part, gather_tp, tp_partition_dim
from framework.weights.shards import plan_shards

UNIVERSAL = "universal"
INDEX = "model.safetensors.index.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


def _local_full(engine, param, key: str | None) -> torch.Tensor:
    """This tensor-parallel rank's full (ZeRO-gathered) fp32 weight (key None) or optimizer moment."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if has_fp32_master(param):
        out = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
        return out.float()
    if key is None:
        return param.detach().float()
    state = inner_optimizer(engine).state.get(param, {})
    return state[key].float() if key in state else torch.zeros_like(param, dtype=torch.float32)


def _read_tp_part(reader, key: str, name: str, tp: int, tp_rank: int) -> torch.Tensor:
    """This rank's part of tensor ``key`` (parameter ``name``'s value or moment), read without the rest of it: an
    even split along the parameter's tensor-parallel dim, as AutoTP splits (the topology makes every split even)."""
    dim = tp_partition_dim(name)
    if tp == 1 or dim is None:
        return reader.get(key)
    sl = reader.get_slice(key)
    return read_part(sl, even_part(dim, sl.get_shape()[dim], tp, tp_rank))


def save_universal(engine, step_dir: str, tp: int, tp_group, optimizer_step: int, max_shard_mb: int = 2000) -> None:
    """Every rank calls this; each gathers every tensor (collectives) and keeps those of the files it owns."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = os.path.join(step_dir, UNIVERSAL)
    os.makedirs(out, exist_ok=True)
    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    relink_optimizer_state(engine)
    # Plan files by full size (3 fp32 tensors a parameter), identically on every rank.
    full_bytes = [(name, 4 * len((None, *MOMENTS)) * (p.ds_numel if hasattr(p, "ds_id") else p.numel())
                   * (tp if tp_partition_dim(name) is not None else 1)) for name, p in params]
    files = plan_shards(full_bytes, max_shard_mb * 2**20)
    owner_of = {name: i for i, names in enumerate(files) for name in names}
    fnames = [f"state-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    mine: dict[int, dict[str, torch.Tensor]] = {}
    weight_map = {}
    for name, p in params:
        i = owner_of[name]
        for key in (None, *MOMENTS):
            full = gather_tp(_local_full(engine, p, key), name, tp, tp_group)
            tname = name if key is None else f"{name}::{key}"
            weight_map[tname] = fnames[i]
            if i % world == rank:
                mine.setdefault(i, {})[tname] = full.detach().cpu().contiguous()
    for i, tensors in mine.items():
        save_file(tensors, os.path.join(out, fnames[i]), metadata={"format": "pt"})
    if rank == 0:
        with open(os.path.join(out, INDEX), "w") as f:
            json.dump({"metadata": {"optimizer_step": optimizer_step}, "weight_map": weight_map}, f, indent=1)


def read_index(step_dir: str) -> dict:
    path = os.path.join(step_dir, UNIVERSAL, INDEX)
    if not os.path.isfile(path):
        raise UserError(f"{step_dir} has no {UNIVERSAL}/ state (saved with checkpoint.universal=false): "
                        "resume it at the layout it was saved with")
    with open(path) as f:
        return json.load(f)


class UniversalReader:
    """Memory-mapped access to a checkpoint's per-parameter tensors by name."""

    def __init__(self, step_dir: str):
        self.dir = os.path.join(step_dir, UNIVERSAL)
        self.index = read_index(step_dir)
        self.weight_map: dict[str, str] = self.index["weight_map"]
        self._files: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str):
        fname = self.weight_map.get(name)
        if fname is None:
            raise UserError(f"{self.dir} has no tensor '{name}': the checkpoint is of another model")
        if fname not in self._files:
            self._files[fname] = safe_open(os.path.join(self.dir, fname), "pt", device="cpu")
        return self._files[fname]

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def get_slice(self, name: str):
        """The tensor as a safetensors slice: ``get_shape()``, and ``[a:b]`` / ``[:, a:b]`` read only those."""
        return self._file(name).get_slice(name)


def load_universal_weights(model: torch.nn.Module, step_dir: str) -> None:
    """Before parallelization: copy the full fp32 weights into the single-device model (AutoTP and ZeRO shard
    them from there)."""
    reader = UniversalReader(step_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = reader.get(name)
            if tuple(full.shape) != tuple(p.shape):
                raise UserError(f"shape mismatch for {name}: checkpoint {tuple(full.shape)} vs model {tuple(p.shape)}")
            p.copy_(full.to(p.dtype))


def load_universal_optimizer(engine, step_dir: str, tp: int, tp_rank: int, optimizer_step: int,
                             materialize) -> None:
    """After parallelization: set every rank's fp32 masters and AdamW moments from the full tensors.

    ``materialize()`` must run one optimizer step that changes nothing (lr 0, zero gradients) so that DeepSpeed
    creates and links its lazily built optimizer state; the values are overwritten here right after.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    materialize()
    relink_optimizer_state(engine)
    reader = UniversalReader(step_dir)
    opt = inner_optimizer(engine)
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            if not p.requires_grad:
                continue
            weight = _read_tp_part(reader, name, name, tp, tp_rank)
            moments = {k: _read_tp_part(reader, f"{name}::{k}", name, tp, tp_rank) for k in MOMENTS}
            if has_fp32_master(p):
                safe_set_full_fp32_param(p, weight.to(p.device))
                for k, v in moments.items():
                    safe_set_full_optimizer_state(p, v.to(p.device), k)
            else:
                p.copy_(weight.to(p.dtype))
                state = opt.state[p]
                for k, v in moments.items():
                    state[k].copy_(v)
        for state in opt.state.values():
            if "step" in state:
                if torch.is_tensor(state["step"]):
                    state["step"].fill_(optimizer_step)
                else:
                    state["step"] = optimizer_step
