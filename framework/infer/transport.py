"""Point-to-point traffic between pipeline stages: the only place in the engine that sends or receives.

Three channels, each its own process group, so that every (group, pair of ranks) carries messages in one
direction only:

- ``ctrl``: the step plans (small int64 tensors of a fixed size), stage s -> s+1. Always gloo, on the host: on
  CUDA a stage reads the plan without synchronising with its device.
- ``fwd``: the hidden states, stage s -> s+1 (NCCL on CUDA, gloo on CPU).
- ``ret``: the sampled token ids, last stage -> stage 0.

Why: NCCL runs a communicator's operations in the order they were issued. Every stage posts the receive for
its next message before it computes (gloo, like NCCL, moves bytes only into a posted buffer, so a late receive
puts a round trip on every hop). At pp=2 stages 0 and 1 are each other's sender and receiver; on one shared
communicator stage 0's early receive (of tokens) would sit ahead of its send (of hidden states) while stage 1's
early receive waited for that very send: a deadlock (NVIDIA/nccl #479, #783). With one group per direction, a
receive only ever waits behind receives of the same stream, whose sends the peer issues in the same order.
The same code runs on gloo, where it also keeps the plans and the hidden states from matching each other's
receives (gloo matches a source's messages in order).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from framework.infer.scheduler import STOP, StepPlan


class Transport:
    def __init__(self, rank: int, pp: int, device: torch.device, plan_capacity: int, dim: int, dtype: torch.dtype,
                 tp: int = 1):
        self.rank, self.pp, self.device, self.dim, self.dtype = rank, pp, device, dim, dtype
        # with tensor parallelism, tp rank r of a stage talks to tp rank r of the next (hidden states are
        # replicated across a stage's tp ranks after its all-reduce); sampled ids go from the last stage's tp
        # rank 0 to rank 0, which schedules
        stage = rank // tp
        self.prev = rank - tp if stage > 0 else None
        self.next = rank + tp if stage < pp - 1 else None
        self.last_leader = (pp - 1) * tp
        self.capacity = plan_capacity
        # every rank creates the groups, in the same order
        self.ctrl = dist.new_group(backend="gloo")
        self.fwd = dist.new_group()
        self.ret = dist.new_group()
        self._plan: tuple[torch.Tensor, object] | None = None
        self._tokens: list[tuple[torch.Tensor, object]] = []
        self._sends: list = []

    # -- stages 1..pp-1: plans and hidden states from the previous stage --------------------------------
    def post_plan(self) -> None:
        buf = torch.empty(self.capacity, dtype=torch.int64)
        self._plan = (buf, dist.irecv(buf, self.prev, group=self.ctrl))

    def recv_plan(self) -> tuple[StepPlan, torch.Tensor]:
        """(plan, its wire buffer); the next plan's receive is posted unless this one is the STOP."""
        buf, work = self._plan
        work.wait()
        plan = StepPlan.decode(buf)
        if plan.flag != STOP:
            self.post_plan()  # the next plan may arrive while this stage computes
        return plan, buf

    def recv_hidden(self, plan: StepPlan) -> torch.Tensor:
        hidden = torch.empty(plan.n_tokens, self.dim, dtype=self.dtype, device=self.device)
        dist.irecv(hidden, self.prev, group=self.fwd).wait()
        return hidden

    # -- stages 0..pp-2: to the next stage ---------------------------------------------------------------
    def send_step(self, plan_buf: torch.Tensor, hidden: torch.Tensor | None) -> None:
        self._sends.append(dist.isend(plan_buf, self.next, group=self.ctrl))
        if hidden is not None:
            self._sends.append(dist.isend(hidden.contiguous(), self.next, group=self.fwd))
        self._sends = [w for w in self._sends if not w.is_completed()]  # free what has gone

    # -- the ring's return: sampled ids, last stage -> stage 0 --------------------------------------------
    def send_tokens(self, tokens: torch.Tensor) -> None:
        msg = torch.cat([torch.tensor([tokens.numel()], dtype=torch.long, device=tokens.device), tokens.long()])
        self._sends.append(dist.isend(msg, 0, group=self.ret))
        self._sends = [w for w in self._sends if not w.is_completed()]

    def post_tokens(self, n: int) -> None:
        """Stage 0, when it sends a step: the receive for that step's n sampled ids (they come back in order)."""
        buf = torch.empty(n + 1, dtype=torch.long, device=self.device)
        self._tokens.append((buf, dist.irecv(buf, self.last_leader, group=self.ret)))

    def take_tokens(self) -> list[int]:
        buf, work = self._tokens.pop(0)
        work.wait()
        return buf[1:].tolist()  # the one device -> host copy a step

    def finish(self) -> None:
        for w in self._sends:
            w.wait()
        self._sends = []
