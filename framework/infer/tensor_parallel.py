"""Tensor parallelism inside a pipeline stage: the collectives of one stage's tp ranks.

world = pp x tp; the tp ranks of a stage are neighbours (rank = stage * tp + tp_rank). Each rank holds its
slice of every weight (framework/weights/layout.py ``tp_slice``): q/k/v and gate/up by output rows, o and down by
input columns, so each layer needs one all-reduce after o and one after down; the embedding and the LM head by
vocabulary rows, so the embedding needs one all-reduce and the head's logits one all-gather. Vocabulary-parallel
rather than replicated: the head is the largest single matrix of a small model's decode (a quarter of Llama 3.2
1B's weights) and is read every token, so splitting it splits the reads that bound latency; replicating it would
also keep 1/tp of the memory from being saved.

The all-reduce: NCCL on CUDA. On CPU, DeepSpeed's shared-memory all-reduce (its CPU accelerator's
``deepspeed_shm_comm`` op) when the stage's group is the whole world (the op knows only the world), else gloo.
Measured on this project's 2-core VM, 2 ranks, fp32: one row of 512 took 8 us through shared memory and over
600 us through gloo (gloo's TCP round trip and thread wake-ups), and a batch-1 decode makes two a layer.
Functional collectives keep the decode step traceable by ``torch.compile``.
"""

from __future__ import annotations

import os
import uuid

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from framework.parallel.deepspeed_hooks import (
    init_shm_allreduce,
    load_shm_allreduce_op,
    shm_all_reduce,
    shm_vector_kernel_level,
    unlink_deepspeed_shm,
)
from framework.parallel.distributed import broadcast_object, new_group
from framework.weights.layout import vocab_chunk


def load_shm_allreduce(dtype: torch.dtype) -> bool:
    """Build (cached after the first time) and initialise DeepSpeed's shared-memory CPU all-reduce on every rank;
    False on every rank where any rank cannot (no compiler, another node, no vector kernels for ``dtype``).

    The op names its shared-memory segments after MASTER_ADDR and MASTER_PORT and never removes them, so a later
    job on the same port would open a stale segment. Each job gets its own name (a token in place of the port,
    agreed over the process group), and each rank unlinks its segment once every rank has mapped it."""
    world, rank = dist.get_world_size(), dist.get_rank()
    token = broadcast_object(uuid.uuid4().hex[:16])
    mod, ok = None, False
    try:
        mod = load_shm_allreduce_op()
        # the ranks of one node: LOCAL_SIZE for the deepspeed launcher, LOCAL_WORLD_SIZE for torchrun
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
        ok = local == world and shm_vector_kernel_level(mod) >= (1 if dtype == torch.float32 else 2)
    except Exception:  # no compiler, no deepspeed op: the backend serves
        ok = False
    votes = [None] * world
    dist.all_gather_object(votes, ok)
    if not all(votes):  # initialise only where every rank can: a rank alone would wait for its peers' segments
        return False
    init_shm_allreduce(mod, world, rank, f"miaotui{token}")
    dist.barrier()  # every rank has mapped every segment: the names can go
    unlink_deepspeed_shm(f"miaotui{token}")
    return True


class TPGroup:
    """This stage's tensor-parallel group; identity operations at tp=1."""

    def __init__(self, pp: int, tp: int, rank: int, device: torch.device, dtype: torch.dtype, vocab: int,
                 allreduce: str = "auto"):
        self.tp, self.tp_rank, self.stage = tp, rank % tp, rank // tp
        self.vocab = vocab
        self.group = self.ctrl = None
        self.shm = False
        if tp == 1:
            return
        for s in range(pp):  # every rank creates every group, in the same order (torch's rule for new_group)
            ranks = list(range(s * tp, (s + 1) * tp))
            # each with the job's timeout, explicitly: torch's default (NCCL 10 min, gloo 30) kills an idle server
            g = new_group(ranks)
            c = new_group(ranks, backend="gloo")  # plans: host tensors, no device sync
            if s == self.stage:
                self.group, self.ctrl = g, c
        if device.type == "cpu" and allreduce in ("auto", "shm") and tp == dist.get_world_size():
            self.shm = load_shm_allreduce(dtype)

    @property
    def leader(self) -> int:
        """Global rank of this stage's tp rank 0."""
        return self.stage * self.tp

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return x
        if self.shm:
            return shm_all_reduce(x)
        return funcol.all_reduce(x, "sum", self.group)

    def embed(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel lookup: each rank fills the rows of its ids, the all-reduce sums them."""
        if self.tp == 1:
            return F.embedding(ids, weight)
        start = self.tp_rank * vocab_chunk(self.vocab, self.tp)
        local = ids - start
        mine = (local >= 0) & (local < weight.shape[0])
        out = F.embedding(local.clamp(0, weight.shape[0] - 1), weight) * mine[..., None].to(weight.dtype)
        return self.all_reduce(out)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """(n, V / tp) on each rank -> (n, V) on every rank."""
        if self.tp == 1:
            return logits
        chunk = vocab_chunk(self.vocab, self.tp)
        if self.shm:  # the shared-memory op only sums: each rank fills its columns of a zero (n, V) table
            full = logits.new_zeros(logits.shape[0], self.vocab)
            start = self.tp_rank * chunk
            full[:, start: start + logits.shape[-1]] = logits
            return self.all_reduce(full)
        if logits.shape[-1] < chunk:  # the last rank's shorter chunk
            logits = F.pad(logits, (0, chunk - logits.shape[-1]))
        full = funcol.all_gather_tensor(logits.t().contiguous(), 0, self.group)  # (tp * chunk, n)
        return full[: self.vocab].t()

    def broadcast_plan(self, buf: torch.Tensor) -> torch.Tensor:
        """Stage 0's tp rank 0 hands each step's plan (int64) to the other ranks of its stage. Through the
        shared-memory op where it serves (a gloo broadcast costs a TCP round trip a step): the ints travel as
        16-bit pieces in fp32, which a sum with the other ranks' zeros leaves exact."""
        if not self.shm:
            dist.broadcast(buf, src=self.leader, group=self.ctrl)
            return buf
        pieces = torch.zeros(buf.numel(), 4, dtype=torch.float32)
        if self.tp_rank == 0:
            for i in range(4):
                pieces[:, i] = ((buf >> (16 * i)) & 0xFFFF).float()
        pieces = shm_all_reduce(pieces)
        out = torch.zeros_like(buf)
        for i in range(4):
            out |= pieces[:, i].long() << (16 * i)
        buf.copy_(out)
        return buf
