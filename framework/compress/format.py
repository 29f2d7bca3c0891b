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
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from framework.cli import UserError

PACK_FORMAT = "pack-quantized"
FUSED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # the engine's loader concatenates these
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json")


# -- bit packing (compressed-tensors' layout) -----------------------------------------------------------------
def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed ``bits``-bit integers (any int dtype) -> int32 words along ``dim`` (0 or 1), zero-padded."""
    if dim == 0:
        return pack_int32(q.t(), bits, 1).t().contiguous()
    per = 32 // bits
    u = (q.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)  # (rows, cols) unsigned
    rows, cols = u.shape
    pad = (-cols) % per
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.view(rows, -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (u << shifts).sum(dim=-1)  # (rows, cols / per) in [0, 2**32)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """The inverse of ``pack_int32``: int8 signed values, ``n`` of them along ``dim``."""
    if dim == 0:
        return unpack_int32(words.t(), bits, n, 1).t().contiguous()
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    u = (w[..., None] >> shifts) & ((1 << bits) - 1)  # (rows, words, per)
    u = u.reshape(words.shape[0], -1)[:, :n]
    return (u - (1 << (bits - 1))).to(torch.int8)


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
def plan_shards(tensors: dict[str, torch.Tensor], max_shard_mb: int) -> list[list[str]]:
    """Names in order, cut into shards of at most ``max_shard_mb`` MiB (a larger tensor gets a shard alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_mb * 2**20:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards if shards[0] else []


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_shards(tmp: str, tensors: dict[str, torch.Tensor], shards: list[list[str]], first: int, n: int) -> dict[str, str]:
    """Write ``shards`` (lists of names) as files ``first``.. of ``n`` into ``tmp``; returns their weight map."""
    wmap = {}
    for i, names in enumerate(shards):
        fname = shard_name(first + i, n)
        save_file({k: tensors[k].contiguous() for k in names}, os.path.join(tmp, fname), metadata={"format": "pt"})
        wmap.update({k: fname for k in names})
    return wmap


def finalize(src_dir: str, tmp: str, out_dir: str, wmap: dict[str, str], total_bytes: int, hf_config: dict) -> None:
    """The index, config.json, the source's tokenizer files and generation_config.json, the manifest; then the
    directory takes its name (it appears whole)."""
    from framework.checkpoint.manifest import write_manifest

    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": wmap}, f, indent=1)
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
    shards = plan_shards(tensors, max_shard_mb)
    wmap = write_shards(tmp, tensors, shards, 0, len(shards))
    finalize(src_dir, tmp, out_dir, wmap, sum(t.numel() * t.element_size() for t in tensors.values()), hf_config)


def dir_size_bytes(path: str) -> int:
    """Bytes of the weight files of a model directory."""
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


# -- reading ---------------------------------------------------------------------------------------------------
def load_stage_tensors(model: torch.nn.Module, model_dir: str, names: list[str], qconfig: dict,
                       device: torch.device, dtype: torch.dtype | None = None, tp: int = 1, tp_rank: int = 0,
                       load_rest=None) -> int:
    """See ``framework.compress.quantize.load_quantized``. With ``tp`` > 1 each quantized layer keeps this rank's
    part, cut as the plain weights are (framework/infer/loader.py ``tp_slice``): column-parallel layers by output
    rows (with their scales and zero points), row-parallel ones by input columns (int8's per-row scales whole,
    int4's groups cut at group boundaries); ``load_rest(names)`` loads the plain tensors (sliced too)."""
    from safetensors import safe_open

    from framework.compress.quantize import Int4Linear, Int8Linear, set_submodule
    from framework.infer.loader import tp_slice
    from framework.models.hf import load_hf_weights, weight_map

    w = weight_args(qconfig)
    bits, group = int(w["num_bits"]), w.get("group_size")
    wmap = weight_map(model_dir)
    quantized = [n[: -len(".weight")] for n in names
                 if n.endswith(".weight") and n[: -len(".weight")] + ".weight_packed" in wmap]
    handles: dict[str, object] = {}

    def handle(name: str):
        fname = wmap[name]
        if fname not in handles:
            handles[fname] = safe_open(os.path.join(model_dir, fname), "pt", device="cpu")
        return handles[fname]

    def read(name: str) -> torch.Tensor:
        return handle(name).get_tensor(name)

    def read_slice(name: str):  # rows or columns read from the file without the rest of the tensor
        return handle(name).get_slice(name)

    for prefix in quantized:
        old = model.get_submodule(prefix)
        dt = dtype or old.weight.dtype
        out_f, in_f = (int(x) for x in read(prefix + ".weight_shape").tolist())
        if (out_f, in_f) != (old.out_features, old.in_features):
            raise UserError(f"shape mismatch for {prefix}: checkpoint {(out_f, in_f)} vs model "
                            f"{(old.out_features, old.in_features)}")
        vocab = getattr(getattr(model, "args", None), "vocab_size", out_f)  # a quantized head: vocabulary rows
        cut = tp_slice(prefix + ".weight", (out_f, in_f), vocab, tp, tp_rank) if tp > 1 else None
        per = 32 // bits  # values a packed int32 word holds, along the input features
        words = read_slice(prefix + ".weight_packed")
        if cut is None:
            q = unpack_int32(words[:], bits, in_f)
        elif cut[0] == 0:  # this rank's output rows only
            q = unpack_int32(words[cut[1]: cut[2]], bits, in_f)
        elif cut[1] % per == 0 and cut[2] % per == 0:  # this rank's input columns: whole words
            q = unpack_int32(words[:, cut[1] // per: cut[2] // per], bits, cut[2] - cut[1])
        else:
            q = unpack_int32(words[:], bits, in_f)[:, cut[1]: cut[2]]
        scale = read(prefix + ".weight_scale").float()
        zp = None
        if bits == 4:
            zp = (torch.zeros(scale.shape, dtype=torch.int8) if w.get("symmetric")
                  else unpack_int32(read(prefix + ".weight_zero_point"), bits, out_f, dim=0))
        if cut is not None and cut[0] == 0:  # column-parallel: output rows, with their scales and zero points
            lo, hi = cut[1], cut[2]
            scale = scale[lo:hi]
            zp = None if zp is None else zp[lo:hi]
            if bits == 4 and (hi - lo) % 16 and prefix.rsplit(".", 1)[-1] not in FUSED:  # a head, packed alone
                raise UserError(f"{prefix}: infer.tp={tp} leaves {hi - lo} output rows a rank, which the int4 "
                                f"kernels cannot run (a multiple of 16 is needed): use another tp, or int8")
        elif cut is not None:  # row-parallel: input columns; int8's per-row scale applies to every part of a row
            lo, hi = cut[1], cut[2]
            if bits == 4:
                if lo % int(group) or hi % int(group):
                    raise UserError(f"{prefix}: infer.tp={tp} cuts its {in_f} inputs inside an int4 group of "
                                    f"{group}: use a group size that divides {in_f // tp}, or a lower tp")
                scale, zp = scale[:, lo // int(group): hi // int(group)], zp[:, lo // int(group): hi // int(group)]
        q = q.contiguous()
        if bits == 8:
            new = Int8Linear(q.to(device), scale.reshape(-1).contiguous().to(device), None, dt)
        else:
            new = Int4Linear(q.to(device), scale.contiguous().to(device), zp.contiguous().to(device), int(group), None,
                             dt)
            if prefix.rsplit(".", 1)[-1] not in FUSED:
                new.pack()  # o, down, head: final now; q|k|v and gate|up are packed by the fusion (Int4Linear.cat)
        if getattr(old, "bias", None) is not None:
            new.bias = torch.empty(q.shape[0], dtype=dt, device=device)  # filled with the plain tensors below
        set_submodule(model, prefix, new)
    handles.clear()
    done = {p + ".weight" for p in quantized}
    rest = [n for n in names if n not in done]
    if load_rest is None:
        load_hf_weights(model, model_dir, names=rest)
    else:
        load_rest(rest)
    return len(quantized)
