"""The engine loop of one rank: stage 0 schedules and sends steps around the ring, the others follow.

Rank 0 (stage 0, tp rank 0) keeps up to one step per lane in flight: whenever a lane is idle and has work it
schedules the lane's next step, hands the plan to its stage's other tp ranks, runs its layers and sends the
step on; otherwise it waits for the oldest step's sampled tokens and gives them to the scheduler. Every other
rank runs the plans it receives, in order (stage 0's tp ranks from rank 0, the others from the same tp rank of
the stage before), and the last stage's tp rank 0 samples and sends the ids back to rank 0. At pp=1 the loop
runs without sending: schedule, run, sample, complete.

While idle, rank 0 sends a keep-alive plan around the ring (and to its stage's tp ranks) every quarter of the
process groups' timeout: every other rank waits for its next plan inside a receive of a process group, and gloo
fails a receive that waits longer than its group's timeout (NCCL's watchdog likewise), so without them an idle
server would die after that timeout. No receive ever waits longer than a quarter of it while the server is up.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from framework.infer.sampler import Sampler, token_logprobs
from framework.infer.scheduler import Scheduler
from framework.infer.step import STOP, StepPlan
from framework.infer.transport import ShmTransport, Transport
from framework.infer.worker import StageWorker
from framework.parallel.distributed import group_timeout, wait_polled

KEEPALIVE = 2  # a plan's flag beside step.GO and STOP: no work, passed on along the ring and ignored


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
        self.keepalive_s = group_timeout().total_seconds() / 4

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> torch.Tensor:
        s = self.sampler
        s.admit(plan.new_slots, plan.new_params)
        slots, pos = plan.sample_slots_positions()
        if s.seen is not None:  # every list of the step in one staged copy
            t_slots, t_tokens, t_s, t_p = self.worker.staging.to_device(plan.token_slots(), plan.tokens, slots, pos)
            s.observe(t_slots, t_tokens)
            return s(logits, t_s, t_p)
        t_s, t_p = self.worker.staging.to_device(slots, pos)
        return s(logits, t_s, t_p)

    def _reply(self, plan: StepPlan, logits: torch.Tensor) -> torch.Tensor:
        """What the last stage returns for a step (int64, on the device): a sampled id per sampled row, then the
        ``token_logprobs`` rows of the sampled rows whose requests want log-probabilities and of the scored prompt
        rows (``Scheduler.reply_len`` counts them), each cut to its request's number of alternatives. Computed
        from the logits the step already has: scoring a prompt costs no second pass."""
        n = plan.n_sample
        ids = self._sample(plan, logits[:n])
        top = self.sampler.top_logprobs
        slots, _ = plan.sample_slots_positions()
        rows, targets, score_slots = plan.score_rows()
        want = [i for i, slot in enumerate(slots) if top[slot] >= 0]
        if not want and not rows:
            return ids
        ks = [top[slots[i]] for i in want] + [top[slot] for slot in score_slots]
        kmax = max(ks)
        pick, tgt = self.worker.staging.to_device(want + list(range(n, n + len(rows))), targets)
        tgt = torch.cat([ids.index_select(0, pick[: len(want)]), tgt])
        table = token_logprobs(logits.index_select(0, pick), tgt, kmax)  # (rows, 1 + 2 kmax)
        width = 1 + 2 * kmax
        flat = [r * width + j for r, k in enumerate(ks) for j in range(1 + 2 * k)]  # each row cut to its k
        return torch.cat([ids.long(), table.flatten().index_select(0, self.worker.staging.to_device(flat)[0])])

    def _host_ids(self, ids: torch.Tensor) -> list[int]:
        """Sampled ids on the host. On CUDA with tensor parallelism the step holds NCCL all-reduces: wait for them by
        polling an event with the groups' deadline rather than inside ``.tolist()``'s synchronisation, so a dead tp
        peer raises (the server's 503 path) and signals are handled (distributed.wait_polled)."""
        if self.device.type == "cuda" and self.tp.tp > 1:
            done = torch.cuda.Event()
            done.record()
            wait_polled(done, group_timeout().total_seconds(), "the tensor-parallel step")
        return ids.tolist()

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
        last_sent = time.monotonic()
        while True:
            if wire and time.monotonic() - last_sent > self.keepalive_s:  # re-arm every waiting receive
                self._send_plan(StepPlan(flag=KEEPALIVE).encode(self.capacity))
                last_sent = time.monotonic()
            if accepting:
                accepting = poll(not sched.has_work() and not in_flight)
            lane = sched.next_lane() if sched.has_work() else None
            if lane is not None:
                plan = sched.schedule(lane)
                if plan is None:
                    continue
                buf = plan.encode(self.capacity) if wire else None
                last_sent = time.monotonic()
                if self.tp.tp > 1:
                    self.tp.broadcast_plan(buf)
                out = self.worker.step(plan, None)  # the worker stages plan.tokens with the step's other lists
                self.steps += 1
                if self.pp == 1:
                    sched.complete(plan, self._host_ids(self._reply(plan, out)))
                else:
                    tr.post_tokens(sched.reply_len(plan))  # posted before the send: the reply lands in a waiting buffer
                    tr.send_step(buf, out)
                    in_flight.append(plan)
                continue
            if in_flight:
                sched.complete(in_flight.popleft(), tr.take_tokens())
                continue
            if accepting:
                continue
            break
        self._send_plan(StepPlan(flag=STOP).encode(self.capacity))

    def _send_plan(self, buf: torch.Tensor) -> None:
        """A plan without hidden states (the STOP, a keep-alive) to this stage's tp ranks and the next stage."""
        if self.tp.tp > 1:
            self.tp.broadcast_plan(buf)
        if self.transport is not None:
            self.transport.send_step(buf, None)

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
            if plan.flag in (STOP, KEEPALIVE):
                if not self.last:
                    tr.send_step(buf, None)
                if plan.flag == STOP:
                    return
                continue
            x = None if self.first else tr.recv_hidden(plan)
            out = self.worker.step(plan, x)
            self.steps += 1
            if not self.last:
                tr.send_step(buf, out)
            elif self.leader:
                tr.send_tokens(self._reply(plan, out))
