"""Device figures the planner works from: memory, dense bf16 peak, HBM bandwidth, links.

Peaks and bandwidths are the vendors' data-sheet figures (dense, no sparsity). The two efficiencies are what
large kernels reach in practice, the share of peak a roofline may assume: cuBLAS bf16 GEMMs of training shapes
and FlashAttention-2 forward + backward (published kernel benchmarks; causal attention is counted at half its
FLOPs in time, whole in MFU, as torchtitan and Megatron count it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    """Memory per device, GiB (what torch.cuda reports as total)."""
    bf16_tflops: float
    """Dense bf16 peak, TFLOP/s."""
    hbm_tbps: float
    """Memory bandwidth, TB/s."""
    intra_gbps: float
    """Per-direction bandwidth to the other devices of a node (NVLink, xGMI, PCIe), GB/s."""
    inter_gbps: float
    """Per-device bandwidth across nodes (InfiniBand / RoCE), GB/s."""
    gemm_efficiency: float
    """Share of peak that large bf16 GEMMs reach."""
    attn_efficiency: float
    """Share of peak that flash attention (forward + backward) reaches."""
    link_latency_us: float = 15.0
    """Start-up latency of one collective or point-to-point message."""


DEVICES: dict[str, Device] = {d.name: d for d in (
    # H100 SXM5 80GB (700 W, HBM3), NVLink 4 (900 GB/s both directions), 400 Gb/s NIC per GPU
    Device("h100", 79.1, 989.0, 3.35, 450.0, 50.0, 0.75, 0.40),
    # H100 96GB HBM2e at 500 W (the platform of torchtitan's published figures)
    Device("h100-96gb", 94.5, 989.0, 2.4, 450.0, 50.0, 0.75, 0.40),
    # H200 SXM 141GB (HBM3e)
    Device("h200", 139.8, 989.0, 4.8, 450.0, 50.0, 0.75, 0.40),
    # A100 SXM4 80GB, NVLink 3 (600 GB/s both directions), 200 Gb/s NIC per GPU
    Device("a100", 79.2, 312.0, 2.039, 300.0, 25.0, 0.80, 0.50),
    Device("a100-40gb", 39.4, 312.0, 1.555, 300.0, 25.0, 0.80, 0.50),
    # L40S 48GB (PCIe 4.0 x16 between devices)
    Device("l40s", 44.4, 362.0, 0.864, 25.0, 25.0, 0.70, 0.40),
    # MI300X 192GB, Infinity Fabric (7 x 64 GB/s per direction)
    Device("mi300x", 191.5, 1307.0, 5.3, 448.0, 50.0, 0.55, 0.35),
)}


def get_device(name: str) -> Device:
    from framework.cli import UserError

    key = name.lower().replace("_", "-")
    if key not in DEVICES:
        raise UserError(f"cluster.gpu={name} is not in the device table: use one of {', '.join(DEVICES)}")
    return DEVICES[key]
