"""Export any saved checkpoint as Hugging Face safetensors.

    python -m framework.export checkpoint=runs/x                      # the run's latest checkpoint
    torchrun --nproc_per_node=4 -m framework.export checkpoint=runs/x/checkpoints/step-000200 out=/tmp/e

A checkpoint with per-parameter state (``universal/``, the default) is exported by any number of processes and
without DeepSpeed: each rank reads the tensors of the shard files it owns, memory-mapped. One saved with
``checkpoint.universal=false`` is exported by rebuilding the engine at the layout it was saved with. A run directory
stands for its newest checkpoint that verifies (framework/checkpoint/resolve.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from omegaconf import OmegaConf

from framework.checkpoint.manager import read_state
from framework.checkpoint.resolve import find_checkpoint, has_universal
from framework.cli import UserError
from framework.config import ExportConfig


def export_step_dir(step_dir: str, out: str, max_shard_mb: int = 2000) -> str:
    """Export from the per-parameter state; every launched rank calls this (no collectives but barriers)."""
    from framework.checkpoint.export import write_export
    from framework.checkpoint.manifest import verify_on_all_ranks
    from framework.checkpoint.universal import UniversalReader
    from framework.models.llama import ModelArgs
    from framework.weights.dtypes import torch_dtype

    verify_on_all_ranks(step_dir)
    state = read_state(step_dir)
    if "model_args" not in state:
        raise UserError(f"{step_dir} predates per-parameter state: export it with the launcher it was trained with")
    args = ModelArgs(**state["model_args"])
    reader = UniversalReader(step_dir)
    run_dir = os.path.dirname(os.path.dirname(os.path.normpath(step_dir)))
    return write_export(reader.get, args, out, os.path.join(run_dir, "tokenizer"), max_shard_mb,
                        torch_dtype(state.get("precision", "fp32"), "parallel.precision"), {"step": state["step"]})


def export_checkpoint(cfg, with_engine: Callable | None = None) -> str:
    """Export the checkpoint ``cfg.checkpoint`` names; one without per-parameter state needs ``with_engine(cfg,
    run_dir, step_dir, state, out)``, which rebuilds the training engine at its layout (``framework.trainer``)."""
    if not isinstance(cfg, ExportConfig):
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExportConfig), cfg))
    run_dir, step_dir = find_checkpoint(cfg.checkpoint)
    out = cfg.out or os.path.join(run_dir, "export")
    state = read_state(step_dir)
    if has_universal(step_dir) and "model_args" in state:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from framework.parallel.distributed import init_distributed, pick_device

            init_distributed(pick_device("cpu"), "gloo", 600)
        export_step_dir(step_dir, out, cfg.max_shard_size_mb)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[miaotui] exported {step_dir} -> {out}", flush=True)
        return out
    if with_engine is None:
        raise UserError(f"{step_dir} has no per-parameter state (saved with checkpoint.universal=false): export it "
                        "with python -m framework.export at the layout it was saved with")
    return with_engine(cfg, run_dir, step_dir, state, out)
