"""The compressed export: Hugging Face safetensors in the compressed-tensors "pack-quantized" layout.

A quantized linear ``<m>`` is stored as (compressed-tensors' names, so that ``transformers`` with the
``compressed-tensors`` package, and vLLM, load the directory as it is):

- ``<m>.weight_packed`` int32 (out, in * bits / 32): the integers offset to unsigned (``q + 2**(bits-1)``),
  ``32 / bits`` consecutive input features a word, the first in the lowest bits;
- ``<m>.weight_scale`` (out, 1) for int8 (per channel), (out, in / group) for int4, in the model's dtype;
- ``<m>.weight_zero_point`` int32 (out / 8, in / group), int4 only (asymmetric): the signed zero points packed
  the same way along the output dimension;
- ``<m>.weight_shape`` int64 [out, in].

config.json carries ``quantization_config`` (``quant_method: compressed-tensors``: bits, strategy, group size,
symmetric or not, and ``ignore``: the linear layers left in full precision) and ``compression_config``, our
own short summary (method, bits, group size, zero-point scheme, what stayed unquantized, the source). Pruned
exports are plain dense safetensors with zeros and only ``compression_config`` (method, sparsity, pattern), so
they load anywhere. Either key marks a directory as already compressed.

The bit packing is framework/weights/io.py (``pack_int32``, ``unpack_int32``, and reading a rank's part of a packed
weight); the shard files and the index are framework/weights/shards.py; loading into Int8Linear/Int4Linear modules is
``framework.compress.quantize.load_quantized``. This module keeps the configs and writing a compressed directory.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from framework.cli import UserError
from framework.weights import shards as sh

PACK_FORMAT = "pack-quantized"
FUSED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # the engine's loader concatenates these
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json")


# -- configs ---------------------------------------------------------------------------------------------------
def quantization_config(bits: int, group_size: int | None, ignore: list[str], symmetric: bool = False) -> dict:
    """config.json's ``quantization_config`` for compressed-tensors (transformers' and vLLM's reader)."""
    weights = {
        "num_bits": bits, "type": "int", "symmetric": bits == 8 or symmetric, "group_size": group_size if bits == 4 else None,
        "strategy": "group" if bits == 4 else "channel", "dynamic": False, "actorder": None, "observer": "minmax",
        "block_structure": None, "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": PACK_FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": PACK_FORMAT}},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


def weight_args(qconfig: dict) -> dict:
    """The weights entry of a compressed-tensors config we can run; UserError for anything else."""
    if qconfig.get("quant_method") != "compressed-tensors" or qconfig.get("format") != PACK_FORMAT:
        raise UserError(f"quantization_config {qconfig.get('quant_method')}/{qconfig.get('format')} is not supported: "
                        f"this engine reads compressed-tensors {PACK_FORMAT} (python -m framework.compress)")
    groups = list(qconfig.get("config_groups", {}).values())
    if len(groups) != 1:
        raise UserError("quantization_config: exactly one config group (one scheme for all linear layers) is supported")
    w = groups[0]["weights"]
    ok = (w.get("type") == "int" and (w["num_bits"], w.get("strategy"), bool(w.get("symmetric"))) in
          {(8, "channel", True), (4, "group", False), (4, "group", True)})
    if not ok:
        raise UserError(f"quantization_config weights {w.get('num_bits')}-bit {w.get('strategy')} "
                        f"symmetric={w.get('symmetric')} is not supported: int8 per channel or int4 per group")
    return w


def is_compressed(hf_config: dict) -> str | None:
    """How a directory was compressed, or None for a plain model."""
    if "compression_config" in hf_config:
        return str(hf_config["compression_config"].get("method", "compressed"))
    if "quantization_config" in hf_config:
        return str(hf_config["quantization_config"].get("quant_method", "quantized"))
    return None


# -- writing ---------------------------------------------------------------------------------------------------
def finalize(src_dir: str, tmp: str, out_dir: str, wmap: dict[str, str], total_bytes: int, hf_config: dict) -> None:
    """The index, config.json, the source's tokenizer files and generation_config.json, the manifest; then the
    directory takes its name (it appears whole)."""
    from framework.checkpoint.manifest import write_manifest

    sh.write_index(tmp, wmap, {"total_size": total_bytes})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=1)
    for name in COPIED_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy2(os.path.join(src_dir, name), os.path.join(tmp, name))
    write_manifest(tmp, {"compression_config": hf_config.get("compression_config")})
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def write_compressed(src_dir: str, out_dir: str, tensors: dict[str, torch.Tensor], hf_config: dict,
                     max_shard_mb: int = 2000) -> None:
    """One process: ``tensors`` as sharded safetensors, the index and config, the source's tokenizer files."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards = sh.plan_shards(sh.tensor_sizes(tensors), max_shard_mb * 2**20)
    wmap = sh.write_shards(tmp, tensors, shards, 0, len(shards))
    finalize(src_dir, tmp, out_dir, wmap, sum(b for _, b in sh.tensor_sizes(tensors)), hf_config)


def dir_size_bytes(path: str) -> int:
    """Bytes of the weight files of a model directory."""
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))

