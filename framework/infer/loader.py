"""Find the model, and load only this stage's tensors, memory-mapped from the sharded safetensors."""

from __future__ import annotations

import os
import resource

import torch

from framework.cli import UserError
from framework.infer.cpu_linear import pack_linears, packing_available
from framework.infer.plan import Stage
from framework.infer.worker import StageWeights
from framework.models.hf import from_hf_config, read_hf_config
from framework.models.llama import Llama, ModelArgs
from framework.weights.dtypes import config_precision, torch_dtype
from framework.weights.io import hf_slice_reader, load_hf_weights, read_tp_part, weight_map


def read_model_args(model_dir: str) -> ModelArgs:
    args = from_hf_config(read_hf_config(model_dir), name=os.path.basename(os.path.abspath(model_dir)))
    weight_map(model_dir)  # fails early, in one line, when the weights are missing
    return args


def rss_mb(device: torch.device | None = None) -> float:
    """Memory this process holds in MiB: on a CUDA ``device`` the allocator's peak (``max_memory_allocated``: what
    the weights and the cache take on the GPU, which host RSS does not see); otherwise the current resident memory
    (Linux), else the peak."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_dtype(name: str | None, model_dir: str, device: torch.device) -> tuple[str, torch.dtype]:
    """infer.dtype, or the export's torch_dtype on CUDA and fp32 on CPU. Raises UserError for an unknown one."""
    if name is None:
        name = config_precision(read_hf_config(model_dir)) if device.type == "cuda" else "fp32"
    return name, torch_dtype(name, "infer.dtype")


def load_tp_weights(model: Llama, model_dir: str, names: list[str], tp: int, tp_rank: int,
                    device: torch.device, dtype: torch.dtype) -> None:
    """Give ``model`` (built on the meta device) this rank's slice of every tensor of ``names``, read slice by
    slice from the safetensors (a rank never reads the other ranks' parts)."""
    get = hf_slice_reader(model_dir)
    loaded: dict[str, torch.Tensor] = {}
    for name in names:
        # cast on the host, tensor by tensor, then copy: the device only ever holds the target dtype
        loaded[name] = read_tp_part(get(name), name, model.args.vocab_size, tp, tp_rank).to(dtype).to(device)
    for name, t in loaded.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(t, requires_grad=False))
        if isinstance(module, torch.nn.Linear) and attr == "weight":
            module.out_features, module.in_features = t.shape
    if model.args.tie_embeddings and model.lm_head is not None and model.model.embed_tokens is not None:
        model.lm_head.weight = model.model.embed_tokens.weight
    for name, p in model.named_parameters():
        if p.is_meta:
            raise UserError(f"{model_dir}: tensor '{name}' was not loaded")


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the tensors this rank holds for ``module``: parameters, buffers and the plain tensor attributes that
    re-laid and quantized layers keep (a packed CPU weight, an int4 kernel layout), each tensor counted once."""
    seen, total = set(), 0
    for m in module.modules():
        attrs = [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
        for t in [*m._parameters.values(), *m._buffers.values(), *attrs]:
            if t is None:
                continue
            size = t.numel() * t.element_size()
            try:
                key = (t.data_ptr(), size)  # a tied weight is one tensor, whatever holds it
            except RuntimeError:  # a tensor without a plain storage (an opaque kernel layout)
                key = (id(t), size)
            if key not in seen:
                seen.add(key)
                total += size
    return total


def load_stage(model_dir: str, args: ModelArgs, stage: Stage, device: torch.device, dtype: torch.dtype,
               quant: str | None = None, group_size: int = 128, rows_hint: int | None = None, tp: int = 1,
               tp_rank: int = 0, compiled: bool = False) -> StageWeights:
    """One stage's weights, laid out for inference.

    Built on the meta device and materialised with only what the stage holds; only its tensors are read
    (memory-mapped). A compressed export's quantized tensors load into quantized modules. Then q|k|v and
    gate|up become one matrix each; ``quant`` quantizes while loading; on CPU in fp32 the remaining linear
    weights are laid out for a decode step of ``rows_hint`` rows, ``compiled`` or not (framework/infer/cpu_linear.py).
    """
    with torch.device("meta"):
        model = Llama(args).keep_only(stage.layers, stage.first, stage.last)
    quantization = read_hf_config(model_dir).get("quantization_config")
    if tp > 1:
        if quantization:
            from framework.compress.quantize import load_quantized

            load_quantized(model, model_dir, stage.tensor_names, quantization, device, dtype, tp, tp_rank,
                           lambda rest: load_tp_weights(model, model_dir, rest, tp, tp_rank, device, dtype))
        else:
            load_tp_weights(model, model_dir, stage.tensor_names, tp, tp_rank, device, dtype)
        weights = StageWeights(model).eval()
        return _finish(weights, model_dir, quant, group_size, rows_hint, dtype, device, quantization, compiled)
    # cast on the meta device (free), then allocate: the stage is materialised in its target dtype, never as an fp32
    # copy on the device first (a 70B model's stage at pp=4 in fp32 would not fit an 80 GB GPU beside its bf16 copy)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    if quantization:
        from framework.compress.quantize import load_quantized

        load_quantized(model, model_dir, stage.tensor_names, quantization, device)
    else:
        load_hf_weights(model, model_dir, names=stage.tensor_names)
    return _finish(StageWeights(model).eval(), model_dir, quant, group_size, rows_hint, dtype, device, quantization,
                   compiled)


def _finish(weights: StageWeights, model_dir, quant, group_size, rows_hint, dtype, device, quantization,
            compiled=False):
    """Quantize while loading (``quant``), run 2:4-pruned weights on the GPU's sparse kernels, and lay the CPU
    fp32 weights out for decoding."""
    compression = read_hf_config(model_dir).get("compression_config") or {}
    if compression.get("pattern") == "2:4" and device.type == "cuda" and dtype != torch.float32:
        from framework.compress.prune import apply_semi_structured

        apply_semi_structured(weights)
    if quantization:
        if quant:
            raise UserError(f"{model_dir} is already quantized ({quantization.get('method', '?')}): drop infer.quant")
        return weights  # a compressed export's fp32 head stays F.linear, as beside infer.quant's layers
    return lay_out_for_decode(weights, quant, group_size, rows_hint, dtype, device, compiled)


def lay_out_for_decode(weights: StageWeights, quant: str | None, group_size: int, rows_hint: int | None,
                       dtype: torch.dtype, device: torch.device, compiled: bool = False) -> StageWeights:
    """Quantize the linears while loading (``quant``: int8 / int4 weight-only, the head kept), or lay the fp32
    weights out for a CPU decode step of ``rows_hint`` rows, ``compiled`` or not (framework/infer/cpu_linear.py).
    An fp32 head beside quantized layers stays F.linear: re-laid, the 30M shape's int8 / int4 decode was 10-17%
    slower at batch 1 and 8, eager and compiled (scripts/bench_quant.py, which times exactly this layout)."""
    if quant:
        from framework.compress.quantize import quantize_linears

        quantize_linears(weights, method=quant, group_size=group_size, head=False)
        return weights
    if rows_hint is not None and packing_available(dtype, device):
        if compiled and rows_hint <= 1:
            weights.fold_norms()
        pack_linears(weights, rows_hint=rows_hint, compiled=compiled)
    return weights
