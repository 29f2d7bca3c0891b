"""Find the model, and load only this stage's tensors, memory-mapped from the sharded safetensors."""

from __future__ import annotations

import os
import resource

import torch

from framework.cli import UserError
from framework.infer.plan import Stage
from framework.models.hf import from_hf_config, load_hf_weights, read_hf_config, weight_map
from framework.models.llama import Llama, ModelArgs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_model_dir(path: str | None) -> tuple[str, str | None]:
    """(export directory, checkpoint to export into it first or None) from an export, a run directory (its
    export/, else its latest checkpoint) or a checkpoint step directory. Raises UserError naming the fix."""
    if not path:
        raise UserError("model_dir is required: an export directory or a run directory")
    if not os.path.isdir(path):
        raise UserError(f"model directory not found: {path}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, None
    export = os.path.join(path, "export")
    if os.path.isfile(os.path.join(export, "config.json")):
        return export, None
    if os.path.isfile(os.path.join(path, "trainer_state.json")) or os.path.isdir(os.path.join(path, "checkpoints")):
        from framework.checkpoint.convert import find_checkpoint, has_universal

        _, step_dir = find_checkpoint(path)
        export = os.path.join(step_dir, "export")
        if os.path.isfile(os.path.join(export, "config.json")):
            return export, None
        if not has_universal(step_dir):
            raise UserError(f"{step_dir} has no per-parameter state to export from: run "
                            f"`python -m framework.export checkpoint={step_dir}` (same launcher as training) first")
        return export, step_dir
    raise UserError(f"{path} holds no config.json nor export/: point model_dir at an export or a run directory")


def read_model_args(model_dir: str) -> ModelArgs:
    args = from_hf_config(read_hf_config(model_dir), name=os.path.basename(os.path.abspath(model_dir)))
    weight_map(model_dir)  # fails early, in one line, when the weights are missing
    return args


def rss_mb() -> float:
    """Current resident memory of this process in MiB (Linux), else the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_stage(model_dir: str, args: ModelArgs, stage: Stage, device: torch.device, dtype: torch.dtype) -> Llama:
    """Build the stage on the meta device, materialize only what it holds, read only its tensors."""
    with torch.device("meta"):
        model = Llama(args).keep_only(stage.layers, stage.first, stage.last)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    load_hf_weights(model, model_dir, names=stage.tensor_names)
    model.fuse_projections()
    from framework.models.llama import rope_inv_freq

    model.inv_freq = rope_inv_freq(args).to(device)
    return model.eval()
