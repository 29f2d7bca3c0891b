"""Linear layers whose fp32 weights are laid out once, at load, the way CPU decoding reads them fastest.

``F.linear`` on CPU multiplies by the transposed weight: for a single row that is a GEMV whose kernel streams
the weight at about half this machine's read bandwidth, and for a few rows a GEMM that first repacks the whole
weight matrix, at every call, into the layout its kernel reads. Decoding multiplies a few rows by every weight of
the model at every step, so both costs are paid in full. Done once at load instead:

- decode batches up to 8 (a call of up to 32 rows: the batch, or a few rows with their draft tokens to verify): the
  weight stays (out, in) and this project's kernel (``framework/kernels/quant_gemv.cpp``, ``f32_gemv``) streams it
  once for all the rows, where the BLAS's GEMV streams it at about half the read bandwidth and its few-row GEMM
  repacks it: a 26M-parameter model's products on 2 threads, 1 / 5 / 8 rows, 4.18 / 5.72 / 7.19 ms with
  ``x @ W_t`` against 3.67 / 4.47 / 4.96 with the kernel; against the blocked layout below, 1 / 4 / 8 / 16 / 24
  rows 3.48 / 3.83 / 4.84 / 5.97 / 7.93 ms with the kernel, 4.27 / 4.86 / 5.52 / 6.46 / 7.35 blocked, and
  F.linear on the plain weight (what a larger call gets) 8.88 / 9.49 / 10.77 ms at 16 / 24 / 32 rows against the
  kernel's 5.35 / 6.45 / 8.30 (a step of 8 rows verifying 3 drafts each is 32 rows). Without a
  C++ compiler the weight is stored transposed, (in, out) contiguous, and ``x @ W_t`` runs as a GEMV for batches of
  1-2, blocked from 3;
- larger batches: the weight is stored in oneDNN's blocked layout and multiplied without repacking.

Both agree with ``F.linear`` to float32 rounding. bf16 and fp16 already run oneDNN kernels through ``F.linear``,
and GPUs never repack, so only fp32 on CPU is touched. One 512x1536 matrix streamed from memory on this project's
2-core EPYC machine, F.linear -> re-laid: 1 row 380 -> 216 us, 8 rows 629 -> 374 us, 128 rows 3436 -> 2030 us.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from framework.kernels import cpu_quant


def packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    """True where re-laying pays and works: fp32 on a CPU whose torch has oneDNN and gives F.linear's results."""
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        w, x = torch.randn(8, 16), torch.randn(3, 16)
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 3), None, "none", [], "")
        return bool(torch.allclose(y, F.linear(x, w), atol=1e-5))
    except (RuntimeError, AttributeError):  # a torch built without these kernels
        return False


class PackedLinear(nn.Module):
    """Inference-only ``nn.Linear`` whose weight lives in oneDNN's blocked layout (the plain copy is dropped)."""

    def __init__(self, linear: nn.Linear, rows_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


class TransposedLinear(nn.Module):
    """Inference-only ``nn.Linear`` whose weight is stored transposed, (in, out) contiguous: a fast GEMV."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = linear.weight.detach().t().contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


class StreamLinear(nn.Module):
    """Inference-only ``nn.Linear`` for calls of a few rows: up to ``KERNEL_ROWS`` rows go through the kernel that
    streams the (out, in) weight once for all of them (``cpu_quant.f32_gemv``: each output row summed in an order
    that depends on the input width alone, so a row gets the same bits whatever rows share its call); more rows
    (a prompt's prefill) are F.linear's GEMM."""

    KERNEL_ROWS = 32  # the kernel beats F.linear well past this (the module's docstring)
    BATCH_MAX = 8  # decode batches (``rows_hint``) laid out for it

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight.detach().contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach()
        # rows a call up to which the kernel runs (0 without a compiler: every call is then F.linear, a
        # RowDotLinear's several rows and a prompt chunk's empty selection alike); Int8Linear's attribute of the same
        # name, which a compiled step warms up on both sides of
        self.gemv_rows = self.KERNEL_ROWS if cpu_quant.available() else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if not self.gemv_rows or x2.shape[0] > self.gemv_rows:
            return F.linear(x, self.weight, self.bias)
        y = cpu_quant.f32_gemv(x2, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class RowDotLinear(StreamLinear):
    """Inference-only ``nn.Linear`` for a compiled one-row decode step: written as a product and a sum over the
    input features, which inductor turns into one vectorised streaming reduction over the (out, in) weight, where
    the call into the BLAS GEMV reads it more slowly (30M Llama, one thread: 4.50 against 5.20 ms a token).
    Outside a compiled graph, or for several rows (a compiled step verifying drafts), it is StreamLinear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.shape[0] == 1:
            y = (x.unsqueeze(-2) * self.weight).sum(-1)
            return y if self.bias is None else y + self.bias
        return super().forward(x)


def relaid(linear: nn.Linear, rows_hint: int, compiled: bool = False) -> nn.Module | None:
    """The faster layout for a call of ``rows_hint`` rows, or None to keep F.linear: up to 8 rows stream the weight
    through this project's kernel where it is built (else the transposed GEMV; a compiled one-row step: inductor's
    reduction, several rows the kernel). The packed kernel costs a
    little more a call, so below 512x512 weights it pays only from 32 rows on. A compiled step never gets it:
    inductor lowers ``mkldnn._linear_pointwise`` only for a weight it froze itself (an AssertionError in its
    lowering, torch 2.13), so there the transposed layout's plain GEMM runs instead."""
    if rows_hint <= 1 and compiled:
        return RowDotLinear(linear)
    if rows_hint <= StreamLinear.BATCH_MAX and cpu_quant.available():
        return StreamLinear(linear)  # compiled too: the kernel is an opaque call in the graph
    if rows_hint <= 2 or compiled:
        return TransposedLinear(linear)
    if linear.weight.numel() >= 2**18 or rows_hint >= 32:
        return PackedLinear(linear, rows_hint)
    return None


def pack_linears(module: nn.Module, rows_hint: int, compiled: bool = False) -> int:
    """Re-lay every ``nn.Linear`` under ``module`` whose weight is not shared (a tied head stays as it is) for
    calls of ``rows_hint`` rows (the decode micro-batch; ``compiled``: in a compiled step); returns how many
    were re-laid."""
    counts: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and counts[id(child.weight)] == 1:
                new = relaid(child, rows_hint, compiled)
                if new is not None:
                    setattr(parent, name, new)
                    n += 1
    return n
