"""The CPU few-row decode kernels (``quant_gemv.cpp``: fp32, int8, int4 weights) as PyTorch operators.

Built once per machine with the host compiler (``-O3 -march=native``: AVX-512 where the CPU has it, else the
compiler's auto-vectorisation of the same loops) through ``torch.utils.cpp_extension`` and cached under
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); a later process only loads the library. The
operators are registered in C++ (``torch.ops.miaotui_quant.*``: the dispatcher calls them without Python) with
shape-only fake implementations here, so ``torch.compile`` keeps them as opaque calls in its graph.

Without a compiler (or with ``MIAOTUI_QUANT_KERNELS=0``) ``available()`` is False and the quantized layers keep
PyTorch's own int8/int4 kernels (slower at batch 1, same results to bf16 rounding) and fp32 layers keep the BLAS
(``framework/infer/cpu_linear.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading

import torch

log = logging.getLogger(__name__)
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quant_gemv.cpp")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fopenmp", "-std=c++17"]

_lock = threading.Lock()
_state: dict[str, bool] = {}


def _cpu_tag() -> str:
    """A short hash of this CPU's feature flags: a library built with -march=native on another CPU is not reused."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def _register_fakes() -> None:
    @torch.library.register_fake("miaotui_quant::f32_gemv")
    def _f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("miaotui_quant::int8_gemv")
    def _int8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("miaotui_quant::int4_gemv")
    def _int4(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0])


def _build() -> bool:
    if os.environ.get("MIAOTUI_QUANT_KERNELS", "1") == "0":
        return False
    if hasattr(torch.ops, "miaotui_quant") and hasattr(torch.ops.miaotui_quant, "f32_gemv"):
        return True  # loaded by another copy of this module (the op library is process-wide)
    from torch.utils.cpp_extension import load

    try:
        load(name=f"miaotui_quant_{_cpu_tag()}", sources=[SOURCE], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError) as e:  # no compiler, no ninja, a failed build
        log.warning("CPU decode kernels unavailable (%s); using PyTorch's own kernels",
                    str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return False
    _register_fakes()
    return True


def available() -> bool:
    """Whether the kernels are loaded (building them on the first call, once a process). Call it outside any
    compiled region: the layers do, when they are built or loaded."""
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                _state["ok"] = _build()
    return _state["ok"]


@contextlib.contextmanager
def disabled():
    """Quantized layers built (or int4 layers packed) inside this block use PyTorch's own kernels, as without a
    compiler: benchmarks time the two paths side by side."""
    saved = dict(_state)
    _state["ok"] = False
    try:
        yield
    finally:
        _state.clear()
        _state.update(saved)


def f32_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(M, K) fp32 x, (N, K) fp32 weight -> (M, N): ``F.linear(x, weight)``, each output row summed in an order that
    depends on K alone (the same bits whatever rows share the call)."""
    return torch.ops.miaotui_quant.f32_gemv(x, weight)


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(M, K) fp32 x, (N, K) int8 weight, (N,) fp32 scale -> (M, N) fp32: ``x @ (qweight * scale[:, None]).T``."""
    return torch.ops.miaotui_quant.int8_gemv(x, qweight, scale)


def int4_gemv(x: torch.Tensor, nibbles: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """(M, K) fp32 x, (N, K/2) uint8 weight in the kernel's nibble layout (``int4_kernel_layout``), (N, K/group)
    fp32 scale and zero (the integer zero point + 8) -> (M, N) fp32: ``x @ ((u - zero) * scale).T``."""
    return torch.ops.miaotui_quant.int4_gemv(x, nibbles, scale, zero, group)


def int4_kernel_layout(u: torch.Tensor) -> torch.Tensor:
    """(N, K) unsigned nibbles (0..15) -> (N, K/2) uint8, 32-feature blocks of 16 bytes: byte j holds feature j in
    its low nibble and feature j + 16 in its high one (the kernel widens a block's 16 bytes into two vectors of
    16 consecutive features with one shift)."""
    n, k = u.shape
    if k % 32:
        raise ValueError(f"int4_kernel_layout: {k} input features is not a multiple of 32")
    blocks = u.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
