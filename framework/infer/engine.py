"""The engine loop of one rank: stage 0 schedules and sends steps around the ring, the others follow.

Rank 0 (stage 0, tp rank 0) keeps up to one step per lane in flight: whenever a lane is idle and has work it
schedules the lane's next step, hands the plan to its stage's other tp ranks, runs its layers and sends the
step on; otherwise it waits for the oldest step's sampled tokens and gives them to the scheduler. Every other
rank runs the plans it receives, in order (stage 0's tp ranks from rank 0, the others from the same tp rank of
the stage before), and the last stage's tp rank 0 samples and sends the ids back to rank 0. At pp=1 the loop
runs without sending: schedule, run, sample, complete.
"""

from __future__ import annotations

from collections import deque

import torch

from framework.infer.sampler import Sampler
from framework.infer.scheduler import STOP, Scheduler, StepPlan
from framework.infer.transport import ShmTransport, Transport
from framework.infer.worker import StageWorker


class Engine:
    def __init__(self, worker: StageWorker, rank: int, pp: int, device: torch.device, plan_capacity: int,
                 sampler: Sampler | None = None, scheduler: Scheduler | None = None,
                 transport: Transport | ShmTransport | None = None):
        self.worker, self.rank, self.pp, self.device = worker, rank, pp, device
        self.sampler, self.scheduler, self.transport = sampler, scheduler, transport
        self.tp = worker.tp
        self.capacity = plan_capacity
        self.stage = rank // self.tp.tp
        self.first, self.last = self.stage == 0, self.stage == pp - 1
        self.leader = self.tp.tp_rank == 0
        self.steps = 0

    def _long(self, xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long, device=self.device)

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> torch.Tensor:
        s = self.sampler
        s.admit(plan.new_slots, plan.new_params)
        if s.seen is not None:
            s.observe(self._long(plan.token_slots()), self._long(plan.tokens))
        slots, pos = plan.sample_slots_positions()
        return s(logits, self._long(slots), self._long(pos))

    def run(self, poll=None) -> None:
        """Run until the scheduler has no work. ``poll(idle) -> bool``, when given, is called on rank 0 before
        every decision: a front end adds requests to the scheduler there (and may block while ``idle``);
        returning False stops the engine once the work it holds is done (a graceful stop)."""
        if self.rank == 0:
            self._run_first(poll)
        else:
            self._run_follower()
        if self.transport is not None:
            self.transport.finish()

    def _run_first(self, poll) -> None:
        sched, tr = self.scheduler, self.transport
        in_flight: deque[StepPlan] = deque()
        accepting = poll is not None
        wire = self.pp > 1 or self.tp.tp > 1
        while True:
            if accepting:
                accepting = poll(not sched.has_work() and not in_flight)
            lane = sched.next_lane() if sched.has_work() else None
            if lane is not None:
                plan = sched.schedule(lane)
                if plan is None:
                    continue
                buf = plan.encode(self.capacity) if wire else None
                if self.tp.tp > 1:
                    self.tp.broadcast_plan(buf)
                out = self.worker.step(plan, self._long(plan.tokens))
                self.steps += 1
                if self.pp == 1:
                    sched.complete(plan, self._sample(plan, out).tolist())
                else:
                    tr.post_tokens(plan.n_sample)  # posted before the send: the reply lands in a waiting buffer
                    tr.send_step(buf, out)
                    in_flight.append(plan)
                continue
            if in_flight:
                sched.complete(in_flight.popleft(), tr.take_tokens())
                continue
            if accepting:
                continue
            break
        stop = StepPlan(flag=STOP).encode(self.capacity)
        if self.tp.tp > 1:
            self.tp.broadcast_plan(stop)
        if tr is not None:
            tr.send_step(stop, None)

    def _run_follower(self) -> None:
        tr = self.transport
        if not self.first:
            tr.post_plan()
        while True:
            if self.first:  # stage 0's other tp ranks: the plan comes from rank 0
                buf = self.tp.broadcast_plan(torch.empty(self.capacity, dtype=torch.int64))
                plan = StepPlan.decode(buf)
            else:
                plan, buf = tr.recv_plan()
            if plan.flag == STOP:
                if not self.last:
                    tr.send_step(buf, None)
                return
            x = self._long(plan.tokens) if self.first else tr.recv_hidden(plan)
            out = self.worker.step(plan, x)
            self.steps += 1
            if not self.last:
                tr.send_step(buf, out)
            elif self.leader:
                tr.send_tokens(self._sample(plan, out))
