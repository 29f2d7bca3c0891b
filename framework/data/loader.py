"""The data-parallel-rank-sharded, resumable loader.

It only draws indices: ``blocks`` is anything indexable by an index tensor with a ``shape`` (the memory-mapped
``TokenBlocks`` / ``DocumentBlocks`` of the token store, or a tensor), and nothing is loaded beyond the rows drawn.
Every step draws one global batch of ``global_batch_size`` blocks from a seeded permutation of the training
blocks, reshuffled every epoch; data-parallel rank r takes the r-th contiguous slice. The batch is sharded by the
dp rank, never by the global rank, so every rank of one tensor-parallel group sees the same rows, and the global
batch is the same set of rows whatever the layout: that is what makes (dp, tp) layouts comparable step by step.
"""

from __future__ import annotations

import torch


class ShardedLoader:
    def __init__(self, blocks, global_batch: int, dp: int, dp_rank: int, seed: int):
        if blocks.shape[0] < global_batch:
            from framework.cli import UserError

            raise UserError(
                f"only {blocks.shape[0]} training blocks for a global batch of {global_batch}: "
                f"lower trainer.global_batch_size or trainer.seq_len, or add data"
            )
        self.blocks, self.global_batch, self.dp, self.dp_rank, self.seed = blocks, global_batch, dp, dp_rank, seed
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.blocks.shape[0], generator=g)

    def next_batch(self):
        """This dp rank's rows of the next global batch: (global_batch / dp, seq_len + 1) (a ``Batch`` with document
        packing)."""
        if self.position + self.global_batch > self._perm.numel():
            self.epoch, self.position = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        idx = self._perm[self.position: self.position + self.global_batch]
        self.position += self.global_batch
        per_rank = self.global_batch // self.dp
        return self.blocks[idx[self.dp_rank * per_rank: (self.dp_rank + 1) * per_rank]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)
