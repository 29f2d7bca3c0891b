"""Find the model, and load only this stage's tensors, memory-mapped from the sharded safetensors."""

from __future__ import annotations

import os
import resource

import torch

from framework.cli import UserError
from framework.infer.cpu_linear import pack_linears, packing_available
from framework.infer.plan import Stage
from framework.infer.worker import StageWeights
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


def default_dtype(name: str | None, model_dir: str, device: torch.device) -> tuple[str, torch.dtype]:
    """infer.dtype, or the export's torch_dtype on CUDA and fp32 on CPU. Raises UserError for an unknown one."""
    if name is None:
        hf = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
        cfg = read_hf_config(model_dir)
        name = hf.get(str(cfg.get("torch_dtype", cfg.get("dtype", "float32"))), "fp32") if device.type == "cuda" else "fp32"
    if name not in DTYPES:
        raise UserError(f"infer.dtype={name}: use fp32, bf16 or fp16")
    return name, DTYPES[name]


def load_stage(model_dir: str, args: ModelArgs, stage: Stage, device: torch.device, dtype: torch.dtype,
               quant: str | None = None, group_size: int = 128, rows_hint: int | None = None) -> StageWeights:
    """One stage's weights, laid out for inference.

    Built on the meta device and materialised with only what the stage holds; only its tensors are read
    (memory-mapped). A compressed export's quantized tensors load into quantized modules. Then q|k|v and
    gate|up become one matrix each; ``quant`` quantizes while loading; on CPU in fp32 the remaining linear
    weights are laid out for a decode step of ``rows_hint`` rows (framework/infer/cpu_linear.py).
    """
    with torch.device("meta"):
        model = Llama(args).keep_only(stage.layers, stage.first, stage.last)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    quantization = read_hf_config(model_dir).get("quantization_config")
    if quantization:
        from framework.compress.quantize import load_quantized

        load_quantized(model, model_dir, stage.tensor_names, quantization, device)
    else:
        load_hf_weights(model, model_dir, names=stage.tensor_names)
    weights = StageWeights(model).eval()
    if quant:
        if quantization:
            raise UserError(f"{model_dir} is already quantized ({quantization.get('method', '?')}): drop infer.quant")
        from framework.compress.quantize import quantize_linears

        quantize_linears(weights, method=quant, group_size=group_size, head=False)
    if rows_hint is not None and packing_available(dtype, device):
        pack_linears(weights, rows_hint=rows_hint)
    return weights
