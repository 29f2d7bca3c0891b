"""Linear layers with their weights packed once, at load, into oneDNN's blocked layout (CPU, fp32).

``F.linear`` on CPU hands each call to a GEMM that first repacks the weight matrix into the layout its kernel
reads. In decoding, every step multiplies a few rows by every weight of the model, so that repacking is a large
share of the step. Packing once at load removes it: on a 2-core EPYC at one thread, the 30M benchmark model's
decode step at 64 rows runs ~15% faster, and the smaller the micro-batch the larger the gain. bf16 and fp16 already
run oneDNN kernels through ``F.linear``; GPUs never repack. Results match ``F.linear`` to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    """True where packing pays and works: fp32 on a CPU whose torch has oneDNN and gives F.linear's results."""
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        w, x = torch.randn(8, 16), torch.randn(3, 16)
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 3), None, "none", [], "")
        return bool(torch.allclose(y, F.linear(x, w), atol=1e-5))
    except (RuntimeError, AttributeError):  # a torch built without these kernels
        return False


class PackedLinear(nn.Module):
    """Inference-only ``nn.Linear`` whose weight lives in oneDNN's layout (the plain copy is dropped)."""

    def __init__(self, linear: nn.Linear, rows_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def worth_packing(linear: nn.Linear, rows_hint: int) -> bool:
    """The packed kernel costs ~20 us more a call than F.linear and saves time in proportion to the weight read:
    measured on this project's CPU machine, it pays from 512x512 weights on up when a call has at least 4 rows,
    and from ~512x1024 on up for single-row decoding. Smaller matrices stay as they are."""
    numel = linear.weight.numel()
    return numel >= 2**18 and (rows_hint >= 4 or numel >= 2**19)


def pack_linears(module: nn.Module, rows_hint: int) -> int:
    """Replace every ``nn.Linear`` under ``module`` that is worth packing and whose weight is not shared (tied) by
    a PackedLinear; returns how many were packed. ``rows_hint``: the rows a decode call multiplies (its batch)."""
    counts: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Linear and counts[id(child.weight)] == 1
                    and worth_packing(child, rows_hint)):
                setattr(parent, name, PackedLinear(child, rows_hint))
                n += 1
    return n
