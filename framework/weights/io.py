"""Reading Hugging Face safetensors by tensor name, memory-mapped: whole tensors, a tensor-parallel rank's rows or
columns (by the layout table), and packed int8/int4 weights (compressed-tensors' pack-quantized layout: int32 words,
scales, zero points), each rank reading only the bytes of its own part.

Our parameter names are Hugging Face's, so a checkpoint maps one to one; the only difference is that a tied model's
files carry no ``lm_head.weight`` (it is read from the embedding).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from framework.cli import UserError
from framework.weights.layout import tp_slice

TIED_HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


def weight_map(model_dir: str) -> dict[str, str]:
    """Tensor name -> safetensors file name, from the index or the single model.safetensors."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return json.load(f)["weight_map"]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return {k: "model.safetensors" for k in f.keys()}
    raise UserError(f"no safetensors weights in {model_dir} (model.safetensors or an index): export the model first")


def source_name(wmap: dict[str, str], name: str, model_dir: str) -> str:
    """The stored name that holds tensor ``name``: itself, or the embedding for a tied model's missing head."""
    if name not in wmap and name == TIED_HEAD and EMBEDDING in wmap:
        return EMBEDDING
    if name not in wmap:
        raise UserError(f"{model_dir} has no tensor '{name}': the checkpoint is of another model shape")
    return name


class WeightFiles:
    """A model directory's safetensors files, each opened (memory-mapped) on first use and kept open until
    ``close``."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.weight_map = weight_map(model_dir)
        self._handles: dict[str, object] = {}

    def _handle(self, source: str):
        from safetensors import safe_open

        fname = self.weight_map[source]
        if fname not in self._handles:
            self._handles[fname] = safe_open(os.path.join(self.model_dir, fname), "pt", device="cpu")
        return self._handles[fname]

    def slice(self, name: str):
        """Tensor ``name`` as a safetensors slice (``get_shape()``; ``[a:b]`` or ``[:, a:b]`` reads only those rows
        or columns)."""
        source = source_name(self.weight_map, name, self.model_dir)
        return self._handle(source).get_slice(source)

    def tensor(self, name: str) -> torch.Tensor:
        source = source_name(self.weight_map, name, self.model_dir)
        return self._handle(source).get_tensor(source)

    def close(self) -> None:
        self._handles.clear()


def read_part(sl, cut: tuple[int, int, int] | None) -> torch.Tensor:
    """Rows (``cut`` = (0, lo, hi)) or columns ((1, lo, hi)) of a safetensors slice, or all of it (None): only
    those bytes are read."""
    if cut is None:
        return sl[:]
    dim, lo, hi = cut
    return sl[lo:hi] if dim == 0 else sl[:, lo:hi]


def hf_slice_reader(model_dir: str):
    """``get(name)``: one tensor of a HF safetensors directory as a memory-mapped safetensors slice (``get_shape()``;
    indexing ``[a:b]`` or ``[:, a:b]`` reads only those rows or columns). A tied model's missing
    ``lm_head.weight`` is the embedding."""
    return WeightFiles(model_dir).slice


def read_tp_part(sl, name: str, vocab: int, tp: int, tp_rank: int) -> torch.Tensor:
    """Rank ``tp_rank``'s part of tensor ``name`` at inference (``layout.tp_slice``), read from its slice ``sl``."""
    return read_part(sl, tp_slice(name, tuple(sl.get_shape()), vocab, tp, tp_rank))


def load_hf_weights(model: torch.nn.Module, model_dir: str, names: list[str] | None = None) -> None:
    """Copy tensors from ``model_dir`` into ``model`` by name, memory-mapped, reading only ``names``.

    A tied model's missing ``lm_head.weight`` is read from ``model.embed_tokens.weight``.
    """
    from safetensors import safe_open

    wmap = weight_map(model_dir)
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied lm_head is listed under both names
    params.update(dict(model.named_buffers()))
    wanted = names if names is not None else [n for n in params if n in model.state_dict()]
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name in wanted:
        source = source_name(wmap, name, model_dir)
        by_file.setdefault(wmap[source], []).append((name, source))
    for fname, pairs in by_file.items():
        with safe_open(os.path.join(model_dir, fname), "pt", device="cpu") as f:
            for name, source in pairs:
                tensor = f.get_tensor(source)
                target = params[name]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise UserError(
                        f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}"
                    )
                with torch.no_grad():
                    target.copy_(tensor.to(target.dtype))


# -- packed int8/int4 weights (compressed-tensors' pack-quantized layout) ---------------------------------------------
def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed ``bits``-bit integers (any int dtype) -> int32 words along ``dim`` (0 or 1), zero-padded: offset to
    unsigned (``q + 2**(bits-1)``), ``32 / bits`` consecutive values a word, the first in the lowest bits."""
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


@dataclass
class PackedPart:
    """One rank's part of a packed linear weight, unpacked: ``w = (q - zero_point) * scale`` by group."""
    q: torch.Tensor  # (rows, cols) int8
    scale: torch.Tensor  # float32: (rows, 1) per channel (int8), (rows, groups) (int4)
    zero_point: torch.Tensor | None  # (rows, groups) int8, int4 only


def packed_prefixes(names: list[str], wmap: dict[str, str]) -> list[str]:
    """The linear layers among tensor ``names`` (``<m>.weight``) that a directory stores packed (``<m>``)."""
    return [n[: -len(".weight")] for n in names if n.endswith(".weight") and n[: -len(".weight")] + ".weight_packed" in wmap]


def packed_shape(files: WeightFiles, prefix: str) -> tuple[int, int]:
    """(out, in) features of the packed linear ``prefix``."""
    out_f, in_f = (int(x) for x in files.tensor(prefix + ".weight_shape").tolist())
    return out_f, in_f


def unpack_part(words, bits: int, in_features: int, cut: tuple[int, int, int] | None) -> torch.Tensor:
    """The (rows, cols) integers of a packed weight's slice ``words`` within ``cut``: output rows read alone, input
    columns read as whole words where the cut falls on word boundaries."""
    if cut is None:
        return unpack_int32(words[:], bits, in_features)
    dim, lo, hi = cut
    per = 32 // bits  # values a packed int32 word holds, along the input features
    if dim == 0:
        return unpack_int32(words[lo:hi], bits, in_features)
    if lo % per == 0 and hi % per == 0:
        return unpack_int32(words[:, lo // per: hi // per], bits, hi - lo)
    return unpack_int32(words[:], bits, in_features)[:, lo:hi]


def cut_scales(prefix: str, scale: torch.Tensor, zp: torch.Tensor | None, cut: tuple[int, int, int] | None, bits: int,
               group: int | None, in_features: int, tp: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scales and zero points of a rank's ``cut``: a column-parallel part's output rows; a row-parallel part's
    groups (int4: the cut must fall on group boundaries) or all of them (int8's per-row scale applies to every part
    of a row)."""
    if cut is None:
        return scale, zp
    dim, lo, hi = cut
    if dim == 0:
        return scale[lo:hi], None if zp is None else zp[lo:hi]
    if bits != 4:
        return scale, zp
    group = int(group)
    if lo % group or hi % group:
        raise UserError(f"{prefix}: infer.tp={tp} cuts its {in_features} inputs inside an int4 group of "
                        f"{group}: use a group size that divides {in_features // tp}, or a lower tp")
    return scale[:, lo // group: hi // group], zp[:, lo // group: hi // group]


def read_packed(files: WeightFiles, prefix: str, bits: int, group: int | None, symmetric: bool,
                cut: tuple[int, int, int] | None = None, tp: int = 1) -> PackedPart:
    """Rank ``cut``'s part (None: all) of the packed linear ``prefix``, ``bits`` 8 (per channel) or 4 (groups of
    ``group``, with zero points unless ``symmetric``), reading only its rows or whole-word columns."""
    out_f, in_f = packed_shape(files, prefix)
    q = unpack_part(files.slice(prefix + ".weight_packed"), bits, in_f, cut)
    scale = files.tensor(prefix + ".weight_scale").float()
    zp = None
    if bits == 4:
        zp = (torch.zeros(scale.shape, dtype=torch.int8) if symmetric
              else unpack_int32(files.tensor(prefix + ".weight_zero_point"), bits, out_f, dim=0))
    scale, zp = cut_scales(prefix, scale, zp, cut, bits, group, in_f, tp)
    return PackedPart(q.contiguous(), scale, zp)
