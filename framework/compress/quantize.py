"""Weight-only quantization: int8 per output channel (symmetric) and int4 in groups (asymmetric), run by this
project's CPU decode kernels at small batches and PyTorch's own mixed-precision kernels elsewhere.

- **int8**: ``w = q * scale``, one fp scale per output row, ``q`` in [-127, 127]. Kernel:
  ``aten._weight_int8pack_mm(x, q, scale)`` (CPU and CUDA).
- **int4**: groups of ``group_size`` consecutive input features of a row share a scale and an integer zero
  point: ``w = (q - zp) * scale`` with ``q, zp`` in [-8, 7] (min/max of the group, 0 kept representable; the
  compressed-tensors convention). PyTorch's int4 kernels ("tinygemm") dequantize ``(u - 8) * s + z`` with
  ``u = q + 8`` unsigned and a float zero ``z``, so ``z = -zp * s`` maps the integer zero point exactly.
  Kernels: ``aten._weight_int4pack_mm_for_cpu`` on CPU, ``aten._weight_int4pack_mm`` on CUDA, each fed by
  its own ``_convert_weight_to_int4pack*`` layout.

Both kernels are fast only with bf16 (or fp16) activations: with fp32 ones, PyTorch's CPU int8/int4 kernels
take a reference path 15-40x slower than the bf16 one (2304x768, one row, 1 thread: int8 1136 us fp32 vs 43 us
bf16; the fp32 re-laid weight takes 75 us). So an fp32 model's activations are rounded to bf16 for the product
and the result is returned in fp32; bf16/fp16 models run in their own dtype. The kernels were measured against
torchao 0.18 (its int8 weight-only tensor: 304 us on the same shape, it dequantizes; its C++ extensions do not
load with our torch) and against the fp32 CPU path of ``framework/infer/cpu_linear.py``; see the README.

Why weight-only: decoding at small batches reads every weight once per step, so its time is the bytes of the
weights; int8 reads a quarter of fp32, int4 an eighth (plus scales). Activations stay in floating point.

CPU decoding (``framework/kernels/quant_gemv.cpp``): PyTorch's kernels above stream the packed bytes at a third of
the rate the compiled fp32 step streams its own, so on CPU a call of at most ``GEMV_MAX_ROWS`` rows (int8; every
call for int4) goes to this project's kernels instead: fp32 activations (no bf16 rounding), each weight widened
in registers (int4: a per-group table of its 16 dequantized values ``(u - zero) * scale``, exactly the values of
``dequantize_int4``), fp32 accumulation, int8's row scale applied after the reduction, output rows split over
torch's threads. The product is the dequantized fp32 product, summed in another order: within a few fp32 ulps of
``sum_k |x_k w_k|`` per output. int4 keeps a CPU layout of its own (``int4_kernel_layout``, built at ``pack()``
from the export's nibbles; the file format is unchanged); with no compiler the layers keep PyTorch's kernels.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from framework.cli import UserError
from framework.compress.format import FUSED, weight_args
from framework.kernels import cpu_quant
from framework.weights.io import WeightFiles, load_hf_weights, packed_prefixes, packed_shape, read_packed
from framework.weights.layout import tp_slice

# int8 calls of at most this many rows use the CPU decode kernel, more use aten's bf16 one. scripts/bench_quant.py
# times both by rows: on this project's 2-core Xeon (one thread, 768x5120) the kernel was faster at every size up to
# 256 rows (1: 393 vs 479 us, 8: 989 vs 1453, 64: 8.3 vs 10.9 ms, 256: 30 vs 46 ms), so aten keeps the large
# prefill chunks only, where neither is the fast path (an fp32 GEMM on the dequantized weight would be)
GEMV_MAX_ROWS = 256
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels accept
METHODS = ("int8", "int4")


# -- quantizers (pure functions) -----------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> q (out, in) int8 in [-127, 127], scale (out,) fp32: ``w ~ q * scale[:, None]``."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def check_group_size(in_features: int, group_size: int, name: str = "") -> None:
    where = f" ({name})" if name else ""
    if group_size not in INT4_GROUP_SIZES:
        raise UserError(f"quant.group_size={group_size}: the int4 kernels take one of {list(INT4_GROUP_SIZES)}")
    if in_features % group_size:
        raise UserError(f"quant.group_size={group_size} does not divide the {in_features} input features{where}: "
                        f"pick a group size that divides it")


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _int4_grid(wg: torch.Tensor, ratio: float, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, scale, zp of groups ``wg`` (out, G, g) quantized over ``ratio`` of their range."""
    if symmetric:
        scale = (wg.abs().amax(dim=-1) * ratio / 7.5).clamp(min=1e-12)
        zp = torch.zeros_like(scale)
    else:
        lo = wg.amin(dim=-1).clamp(max=0.0) * ratio
        hi = wg.amax(dim=-1).clamp(min=0.0) * ratio
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)
        zp = torch.round(-8.0 - lo / scale).clamp(-8, 7)
    q = torch.round(wg / scale[..., None] + zp[..., None]).clamp(-8, 7)
    return q, scale, zp


def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float -> q (out, in) int8 in [-8, 7], scale (out, in/g) fp32, zero_point (out, in/g) int8
    in [-8, 7]: ``w ~ (q - zp) * scale`` per group of ``group_size`` input features.

    Asymmetric: the grid spans the group's [min, max] (0 included); symmetric: zp = 0, scale = max|w| / 7.5
    (compressed-tensors' convention). Each group then keeps whichever of ``CLIP_RATIOS`` of that range gives the
    smallest squared error: clipping a few outliers buys a finer step for the rest (the clip search of AWQ and
    llama.cpp, here without activations)."""
    out_f, in_f = w.shape
    check_group_size(in_f, group_size)
    wg = w.detach().float().reshape(out_f, in_f // group_size, group_size)  # (out, G, g)
    best = None
    for ratio in CLIP_RATIOS:
        q, scale, zp = _int4_grid(wg, ratio, symmetric)
        err = ((q - zp[..., None]) * scale[..., None] - wg).pow(2).sum(-1)  # (out, G)
        if best is None:
            best = [err, q, scale, zp]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better[..., None], q, best[1])
        best[2] = torch.where(better, scale, best[2])
        best[3] = torch.where(better, zp, best[3])
    _, q, scale, zp = best
    return q.reshape(out_f, in_f).to(torch.int8), scale, zp.to(torch.int8)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    out_f, in_f = q.shape
    g = in_f // scale.shape[1]
    wg = (q.float().reshape(out_f, -1, g) - zp.float()[..., None]) * scale.float()[..., None]
    return wg.reshape(out_f, in_f)


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """Activations' dtype inside the integer kernels: bf16 for fp32 models (the fast path), else their own."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


# -- modules ---------------------------------------------------------------------------------------------------
_CUDA_INT8_KERNEL: bool | None = None


def cuda_int8_kernel() -> bool:
    """Whether this torch has a CUDA kernel for ``aten._weight_int8pack_mm`` (added in 2025: pytorch#159325);
    probed once, outside any compiled region. Without it, Int8Linear uses gpt-fast's formulation, which
    ``torch.compile`` (on by default for CUDA decoding) fuses into one kernel reading the int8 weights."""
    global _CUDA_INT8_KERNEL
    if _CUDA_INT8_KERNEL is None:
        try:
            x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
            w = torch.ones(32, 64, device="cuda", dtype=torch.int8)
            y = torch.ops.aten._weight_int8pack_mm(x, w, torch.ones(32, device="cuda", dtype=torch.bfloat16))
            _CUDA_INT8_KERNEL = bool(torch.allclose(y.float(), x.float().sum(1, keepdim=True).expand(2, 32), atol=0.5))
        except (RuntimeError, NotImplementedError):
            _CUDA_INT8_KERNEL = False
    return _CUDA_INT8_KERNEL


class Int8Linear(nn.Module):
    """Weight-only int8 linear, per-output-channel symmetric scales. ``forward``: (..., in) -> (..., out) in
    the input's dtype."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.dtype = dtype
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())  # (out, in)
        self.register_buffer("scale", scale.reshape(-1).float().contiguous())  # (out,)
        # fp32 models: the kernel runs with unit scales and the fp32 scale is applied to its output (a bf16 scale
        # would add a per-row error as large as int8's own); other dtypes pass their scale to the kernel.
        kdt = kernel_dtype(dtype)
        kscale = torch.ones_like(self.scale) if dtype == torch.float32 else self.scale
        self.register_buffer("kernel_scale", kscale.to(kdt), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.use_kernel = self.qweight.device.type != "cuda" or cuda_int8_kernel()
        # rows a call up to which the CPU decode kernel runs (0: never; set before any compiled step is traced)
        self.gemv_rows = GEMV_MAX_ROWS if self.qweight.device.type == "cpu" and cpu_quant.available() else 0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_int8(linear.weight)
        return cls(q, scale, linear.bias, linear.weight.dtype)

    @classmethod
    def cat(cls, mods: list[Int8Linear]) -> Int8Linear:
        """One module whose output is the concatenation of ``mods``' outputs (exact: scales are per row)."""
        bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods])
        return cls(torch.cat([m.qweight for m in mods]), torch.cat([m.scale for m in mods]), bias, mods[0].dtype)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= self.gemv_rows and x2.device.type == "cpu":
            y = cpu_quant.int8_gemv(x2.float(), self.qweight, self.scale).to(x.dtype)  # (N, out)
            y = y.view(*shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        x2 = x2.to(self.kernel_scale.dtype)
        if self.use_kernel:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.kernel_scale)  # (N, out)
        else:
            y = torch.nn.functional.linear(x2, self.qweight.to(x2.dtype)) * self.kernel_scale
        y = y.float() * self.scale if self.dtype == torch.float32 else y.to(x.dtype)
        y = y.view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8"


class Int4Linear(nn.Module):
    """Weight-only int4 linear, groups of ``group_size`` input features with a scale and an integer zero point.

    It holds the weights in a plain layout (``qweight`` (out, in/2) uint8, two unsigned nibbles a byte, low
    nibble first) until ``pack()`` (or its first ``forward``) converts them to the kernel's layout and drops
    the plain copy: on CPU the decode kernel's nibble blocks (``cpu_quant.int4_kernel_layout``, every batch size:
    aten's CPU kernel is no faster at any, and a second copy would double the weights), on CUDA (or on a CPU
    without the kernel) aten's tiled layout. These do not concatenate row-wise, so ``cat`` (the loader's q|k|v
    fusion) takes plain modules and returns a packed one. ``load_quantized`` packs at once the modules no fusion
    will take. The packed tensors are non-persistent buffers: CUDA graphs (and ``.to()``) treat them as the
    module's own static tensors, never as per-step inputs to copy."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.dtype = dtype
        u = (q.to(torch.int16) + 8).to(torch.uint8)  # (out, in) in [0, 15]
        self.register_buffer("qweight", (u[:, ::2] | (u[:, 1::2] << 4)).contiguous())  # (out, in/2)
        self.register_buffer("scale", scale.float().contiguous())  # (out, G)
        self.register_buffer("zero_point", zp.to(torch.int8).contiguous())  # (out, G)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.register_buffer("packed", None, persistent=False)  # the kernel's layout of the weights, after pack()
        self.register_buffer("scales_and_zeros", None, persistent=False)  # aten: (G, out, 2) in bf16
        self.register_buffer("kernel_zero", None, persistent=False)  # CPU kernel: zero point + 8, (out, G) fp32

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, symmetric: bool = False) -> Int4Linear:
        q, scale, zp = quantize_int4(linear.weight, group_size, symmetric)
        return cls(q, scale, zp, group_size, linear.bias, linear.weight.dtype)

    @classmethod
    def cat(cls, mods: list[Int4Linear]) -> Int4Linear:
        """One module whose output is the concatenation of ``mods``' outputs (exact: groups lie inside rows)."""
        if any(m.qweight is None for m in mods):
            raise RuntimeError("Int4Linear.cat needs modules not yet packed for the kernel")
        bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods])
        q = torch.cat([m.int_weight() for m in mods])
        fused = cls(q, torch.cat([m.scale for m in mods]), torch.cat([m.zero_point for m in mods]),
                    mods[0].group_size, bias, mods[0].dtype)
        fused.pack()  # a fused module is final: lay it out for the kernel now, not inside a compiled step
        return fused

    def int_weight(self) -> torch.Tensor:
        """(out, in) int8 in [-8, 7] from the plain layout (before ``pack``)."""
        if self.qweight is None:
            raise RuntimeError("Int4Linear: the plain weights were dropped when packed for the kernel")
        u = torch.stack([self.qweight & 0xF, self.qweight >> 4], dim=-1).reshape(self.out_features, self.in_features)
        return u.to(torch.int8) - 8

    def dequantized(self) -> torch.Tensor:
        return dequantize_int4(self.int_weight(), self.scale, self.zero_point)

    @torch.no_grad()
    def pack(self) -> None:
        """Convert to the kernel layout of this device (once; the plain copy is dropped)."""
        if self.packed is not None:
            return
        if self.qweight.device.type == "cpu" and cpu_quant.available():
            u = torch.stack([self.qweight & 0xF, self.qweight >> 4], dim=-1).reshape(self.out_features, -1)
            self.packed = cpu_quant.int4_kernel_layout(u)  # (out, in/2)
            self.kernel_zero = (self.zero_point.float() + 8).contiguous()  # the nibbles are q + 8
            self.qweight = None
            return
        kdt = torch.bfloat16  # the int4 kernels' activation dtype on CPU and CUDA
        s = self.scale
        z = -self.zero_point.float() * s
        self.scales_and_zeros = torch.stack([s.t(), z.t()], dim=-1).to(kdt).contiguous()  # (G, out, 2)
        if self.qweight.device.type == "cuda":
            # CUDA: the kernel's tiled layout is made from (out, in/2) uint8 with the even feature in the high nibble.
            u = torch.stack([self.qweight & 0xF, self.qweight >> 4], dim=-1).reshape(self.out_features, -1)
            hi_lo = ((u[:, ::2] << 4) | u[:, 1::2]).contiguous()
            tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)  # in % (16 * tiles) == 0
            self.packed = torch.ops.aten._convert_weight_to_int4pack(hi_lo, tiles)
        else:
            u = torch.stack([self.qweight & 0xF, self.qweight >> 4], dim=-1).reshape(self.out_features, -1)
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32), 1)
        self.qweight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            self.pack()
        shape = x.shape
        if self.kernel_zero is not None:
            x2 = x.reshape(-1, self.in_features).float()
            y = cpu_quant.int4_gemv(x2, self.packed, self.scale, self.kernel_zero, self.group_size).to(x.dtype)
            y = y.view(*shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        x2 = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
        if x2.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
                f"group_size={self.group_size}")


QUANTIZED = (Int8Linear, Int4Linear)


def check_int4_shape(out_features: int, in_features: int, group_size: int, name: str = "") -> None:
    check_group_size(in_features, group_size, name)
    if out_features % 16:
        raise UserError(f"{name or 'a linear layer'} has {out_features} output features: the int4 kernels need a "
                        f"multiple of 16 (keep it in full precision or use method=int8)")


def quantize_linear(linear: nn.Linear, method: str, group_size: int = 128) -> nn.Module:
    if method == "int8":
        return Int8Linear.from_linear(linear)
    if method == "int4":
        return Int4Linear.from_linear(linear, group_size)
    raise UserError(f"quantization method '{method}': use one of {', '.join(METHODS)}")


def shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (a tied head and embedding)."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return {k for k, c in counts.items() if c > 1}


def quantizable_linears(model: nn.Module, head: bool = False) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every plain ``nn.Linear`` to quantize: all but the LM head (unless
    ``head``) and those whose weight is shared (a tied head)."""
    shared = shared_weights(model)
    out = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or id(mod.weight) in shared:
            continue
        if name.split(".")[-1] == "lm_head" and not head:
            continue
        out.append((name, mod))
    return out


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def quantize_linears(model: nn.Module, method: str, group_size: int = 128, head: bool = False) -> int:
    """Replace the plain ``nn.Linear`` modules under ``model`` by quantized ones, in place (the LM head only
    when ``head``; tied weights never); returns how many. Refuses, before changing anything, a shape the
    kernels cannot take."""
    if method not in METHODS:
        raise UserError(f"quantization method '{method}': use one of {', '.join(METHODS)}")
    targets = quantizable_linears(model, head)
    if method == "int4":
        for name, mod in targets:
            check_int4_shape(mod.out_features, mod.in_features, group_size, name)
    for name, mod in targets:
        new = quantize_linear(mod, method, group_size)
        if isinstance(new, Int4Linear):
            new.pack()
        set_submodule(model, name, new)
    return len(targets)


# -- loading a compressed export -------------------------------------------------------------------------------
def load_quantized(model: nn.Module, model_dir: str, names: list[str], qconfig: dict, device, dtype=None, tp: int = 1,
                   tp_rank: int = 0, load_rest=None) -> int:
    """Load every tensor in ``names`` (a stage's checkpoint names) from a compressed export into ``model``: the
    linear layers the export stores quantized become Int8Linear / Int4Linear, the rest are copied into the
    model's parameters (``load_rest(names)`` when given: the plain tensors of a tensor-parallel rank, sliced too).
    Reads only these tensors, memory-mapped. With ``tp`` > 1 each quantized layer keeps this rank's part, cut as the
    plain weights are (``framework.weights.layout.tp_slice``): column-parallel layers by output rows (with their
    scales and zero points), row-parallel ones by input columns (int8's per-row scales whole, int4's groups cut at
    group boundaries). Returns the number of quantized modules."""
    w = weight_args(qconfig)
    files = WeightFiles(model_dir)
    quantized = packed_prefixes(names, files.weight_map)
    for prefix in quantized:
        set_submodule(model, prefix, load_quantized_linear(model, files, prefix, w, torch.device(device), dtype, tp,
                                                           tp_rank))
    files.close()
    done = {p + ".weight" for p in quantized}
    rest = [n for n in names if n not in done]
    if load_rest is None:
        load_hf_weights(model, model_dir, names=rest)
    else:
        load_rest(rest)
    return len(quantized)


def load_quantized_linear(model: nn.Module, files: WeightFiles, prefix: str, w: dict, device: torch.device,
                          dtype: torch.dtype | None, tp: int, tp_rank: int) -> nn.Module:
    """The Int8Linear / Int4Linear that replaces ``model``'s plain linear ``prefix``, holding this rank's part of
    the export's packed weight (``w``: the config's weights entry). A bias is left empty, for the plain tensors."""
    old = model.get_submodule(prefix)
    dt = dtype or old.weight.dtype
    bits, group = int(w["num_bits"]), w.get("group_size")
    out_f, in_f = packed_shape(files, prefix)
    if (out_f, in_f) != (old.out_features, old.in_features):
        raise UserError(f"shape mismatch for {prefix}: checkpoint {(out_f, in_f)} vs model "
                        f"{(old.out_features, old.in_features)}")
    vocab = getattr(getattr(model, "args", None), "vocab_size", out_f)  # a quantized head: vocabulary rows
    cut = tp_slice(prefix + ".weight", (out_f, in_f), vocab, tp, tp_rank) if tp > 1 else None
    fused = prefix.rsplit(".", 1)[-1] in FUSED
    if bits == 4 and cut is not None and cut[0] == 0 and (cut[2] - cut[1]) % 16 and not fused:  # a head, packed alone
        raise UserError(f"{prefix}: infer.tp={tp} leaves {cut[2] - cut[1]} output rows a rank, which the int4 "
                        f"kernels cannot run (a multiple of 16 is needed): use another tp, or int8")
    part = read_packed(files, prefix, bits, group, bool(w.get("symmetric")), cut, tp)
    if bits == 8:
        new = Int8Linear(part.q.to(device), part.scale.reshape(-1).contiguous().to(device), None, dt)
    else:
        new = Int4Linear(part.q.to(device), part.scale.contiguous().to(device), part.zero_point.contiguous().to(device),
                         int(group), None, dt)
        if not fused:
            new.pack()  # o, down, head: final now; q|k|v and gate|up are packed by the fusion (Int4Linear.cat)
    if getattr(old, "bias", None) is not None:
        new.bias = torch.empty(part.q.shape[0], dtype=dt, device=device)  # filled with the plain tensors
    return new
