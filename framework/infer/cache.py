"""The KV cache: preallocated per stage, static shapes, owned slot by slot.

Each layer of a stage holds K and V of shape (slots + 1, n_kv, max_len, head_dim), allocated once. A running
sequence owns one slot for its whole life and writes its keys and values at its own positions, so no tensor
ever changes shape (what ``torch.compile`` and CUDA graphs need). The extra last slot is scratch: rows that
only pad a batch up to a compiled size write there.

Sizing: ``infer.kv_cache_gb`` of memory per stage on CPU, or ``infer.gpu_memory_utilization`` of the device's
free memory (after the weights) on CUDA; slots = min(max_batch, what fits). Every stage must agree on the
slot count, so the engine takes the minimum over stages.
"""

from __future__ import annotations

import torch

from framework.cli import UserError


def bytes_per_slot(n_layers: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype) -> int:
    """K and V of one sequence of ``max_len`` positions in every layer of a stage."""
    return 2 * n_layers * kv_heads * max_len * head_dim * torch.tensor([], dtype=dtype).element_size()


def fit_slots(budget_bytes: float, per_slot: int, max_batch: int, max_len: int) -> int:
    """Slots that fit the budget, at most max_batch; one line naming the fix when not even one fits."""
    fits = int(budget_bytes // max(per_slot, 1)) - 1  # the scratch slot is paid too
    if fits < 1:
        raise UserError(f"the KV cache budget ({budget_bytes / 2**30:.3g} GiB a stage) holds no sequence of {max_len} "
                        f"tokens ({per_slot / 2**20:.1f} MiB each): raise infer.kv_cache_gb (CPU) or "
                        f"infer.gpu_memory_utilization (CUDA), or lower infer.max_seq_len")
    return min(fits, max_batch)


def kv_budget_bytes(device: torch.device, kv_cache_gb: float, gpu_memory_utilization: float) -> float:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # what the weights left free, less what the rest of the device must keep (activations, graphs)
        return max(free - (1 - gpu_memory_utilization) * total, 0)
    return kv_cache_gb * 2**30


class KVCache:
    """K and V for every layer of a stage; slot ``n_slots`` is scratch."""

    def __init__(self, layers: list[int], n_slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.n_slots, self.max_len = n_slots, max_len
        shape = (n_slots + 1, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]

    @property
    def scratch(self) -> int:
        return self.n_slots

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class SlotPool:
    """Free slots, lowest first: the rows of a lane then sit in consecutive slots, whose cache a decode step reads
    as one view instead of gathering it."""

    def __init__(self, slots: range | list[int]):
        self.free = sorted(slots, reverse=True)

    def take(self) -> int | None:
        return self.free.pop() if self.free else None

    def give(self, slot: int) -> None:
        self.free.append(slot)
        self.free.sort(reverse=True)

    def __len__(self) -> int:
        return len(self.free)
