"""Schedule, throughput and utilisation: small pure functions the loop calls."""

from __future__ import annotations

import math
import resource

import torch

# Dense bf16 peak TFLOP/s per device (no sparsity), from the vendors' data sheets.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "A10G": 125.0,
    "L4": 121.0,
    "L40S": 362.0,
    "V100": 125.0,
    "RTX 4090": 165.0,
    "MI300X": 1307.0,
}


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def device_peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    """Peak TFLOP/s per device for MFU: the config's value, else the table (fp32 counts as 1/2 of bf16 with TF32)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak if precision in ("bf16", "fp16") else peak / 2
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process since ``reset_peak_memory`` (or its start): the CUDA allocator's peak on GPU,
    the resident-set high-water mark on CPU (Linux's VmHWM; the lifetime ru_maxrss elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kib / 2**20
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_memory(device: torch.device) -> None:
    """Start ``peak_memory_gb`` afresh from what the process holds now (CUDA's peak stats; on Linux CPUs, writing
    5 to /proc/self/clear_refs resets VmHWM), so that the peak of the training is not the data preparation's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def current_memory_gb(device: torch.device) -> float:
    """Memory this process holds now: the CUDA allocator's on GPU, the resident set on CPU (Linux)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    try:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return peak_memory_gb(device)
