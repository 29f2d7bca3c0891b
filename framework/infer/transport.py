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

The hidden states go over one group per pipeline edge (stage s tp rank t -> stage s+1 tp rank t): at pp>=3 a
middle stage receives from s-1 and sends to s+1, and on one communicator NCCL would run the two in issue order,
so its send of step n would queue behind its receive of step n+1 (lock-step). One communicator per edge keeps
each NCCL stream one-directional and independent.

Every group gets the job's timeout explicitly (``distributed.new_group``): torch's default for new groups (NCCL 10
minutes, gloo 30) would kill an idle server. The engine also never leaves a receive waiting longer than that
timeout while idle (engine.py's keep-alive plans).

On CUDA, rank 0 never blocks inside ``work.wait()`` or a device -> host copy of a step's sampled ids: it polls
``work.is_completed()`` with a deadline (``distributed.wait_polled``), so a dead stage raises (the server then
answers 503 and exits 1) and signal handlers keep running. On CPU the waits are gloo's, which report a closed
connection at once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from framework.infer.step import STOP, StepPlan
from framework.parallel.distributed import group_timeout, new_group, wait_polled


class Transport:
    kind = "process groups"

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
        # every rank creates every group, in the same order (torch's rule for new_group), each with the job's timeout
        self.ctrl = new_group(backend="gloo")
        # one hidden-state group per pipeline edge (see the module's docstring); edge (s, t): s*tp+t -> (s+1)*tp+t
        self.fwd_in = self.fwd_out = None
        for s in range(pp - 1):
            for t in range(tp):
                g = new_group([s * tp + t, (s + 1) * tp + t])
                if rank == s * tp + t:
                    self.fwd_out = g
                if rank == (s + 1) * tp + t:
                    self.fwd_in = g
        self.ret = new_group([0, self.last_leader])  # the ring's return edge: last stage's tp rank 0 -> rank 0
        # CUDA: how long rank 0 waits for a step's sampled ids before it declares the ring broken
        self.deadline_s = group_timeout().total_seconds()
        self.cuda = device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(device) if self.cuda and rank == 0 else None
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
        # NCCL: wait() only makes this stage's stream wait for the receive (the host goes on to enqueue the step)
        dist.irecv(hidden, self.prev, group=self.fwd_in).wait()
        return hidden

    # -- stages 0..pp-2: to the next stage ---------------------------------------------------------------
    def send_step(self, plan_buf: torch.Tensor, hidden: torch.Tensor | None) -> None:
        self._sends.append(dist.isend(plan_buf, self.next, group=self.ctrl))
        if hidden is not None:
            # NCCL reads ``hidden`` on its own stream after this call returns: the tensor must not be rewritten until
            # the send completes. The worker hands over a tensor of its own, never a CUDA graph's static output
            # buffer (worker.py ``_decode_only``), and the caching allocator keeps its memory until NCCL is done.
            self._sends.append(dist.isend(hidden.contiguous(), self.next, group=self.fwd_out))
        self._sends = [w for w in self._sends if not w.is_completed()]  # free what has gone

    # -- the ring's return: sampled ids, last stage -> stage 0 --------------------------------------------
    def send_tokens(self, tokens: torch.Tensor) -> None:
        # the count is filled on the device: no pageable host -> device copy (a synchronisation on CUDA)
        msg = torch.cat([tokens.new_full((1,), tokens.numel(), dtype=torch.long), tokens.long()])
        self._sends.append(dist.isend(msg, 0, group=self.ret))
        self._sends = [w for w in self._sends if not w.is_completed()]

    def post_tokens(self, n: int) -> None:
        """Stage 0, when it sends a step: the receive for that step's n sampled ids (they come back in order)."""
        buf = torch.empty(n + 1, dtype=torch.long, device=self.device)
        self._tokens.append((buf, dist.irecv(buf, self.last_leader, group=self.ret)))

    def take_tokens(self) -> list[int]:
        buf, work = self._tokens.pop(0)
        if not self.cuda:
            work.wait()  # gloo: a dead peer's closed connection raises here at once
            return buf[1:].tolist()
        # CUDA: poll, never block inside the driver (see the module's docstring)
        wait_polled(work, self.deadline_s, "the last pipeline stage's sampled ids")
        # The receive has completed on NCCL's stream (its end event is done), so its bytes are visible to any
        # stream: copy them on a side stream, not behind the steps already enqueued on the compute stream.
        with torch.cuda.stream(self._copy_stream):
            return buf[1:].tolist()  # the one device -> host copy a step

    def finish(self) -> None:
        for w in self._sends:
            w.wait()
        self._sends = []


class ShmTransport:
    """The same calls as ``Transport``, through shared-memory rings (framework/infer/shm_ring.py) for the ranks of
    one CPU host: each step's plan and hidden states travel as one message, and no receive waits on a helper
    thread. ``connect`` builds it on every rank, or returns None on every rank where any rank cannot map the
    segments (another host, no /dev/shm)."""

    kind = "shared memory"

    def __init__(self, dtype: torch.dtype, dim: int, inbox, outbox, ret_in, ret_out):
        self.dtype, self.dim = dtype, dim
        self.inbox, self.outbox, self.ret_in, self.ret_out = inbox, outbox, ret_in, ret_out
        self._hidden: torch.Tensor | None = None

    @classmethod
    def connect(cls, rank: int, pp: int, tp: int, plan_capacity: int, max_tokens: int, reply_ints: int, dim: int,
                dtype: torch.dtype, lanes: int) -> ShmTransport | None:
        import os
        import uuid

        from framework.infer import shm_ring
        from framework.parallel.distributed import broadcast_object

        world = dist.get_world_size()

        def everyone(ok) -> list:
            votes = [None] * world
            dist.all_gather_object(votes, ok)
            return votes

        token = broadcast_object(uuid.uuid4().hex[:16])
        # (pid, PID namespace, usable) of every rank: one namespace, or the peer check would see live peers as gone
        seen = everyone((os.getpid(), shm_ring.pid_namespace(), shm_ring.usable()))
        pids = {r: pid for r, (pid, _, _) in enumerate(seen)}
        if not all(ns == seen[0][1] != "" and ok for _, ns, ok in seen):
            return None
        stage = rank // tp
        prev = rank - tp if stage > 0 else None
        nxt = rank + tp if stage < pp - 1 else None
        last_leader = (pp - 1) * tp
        shm_ring.sweep_orphans()  # segments of an earlier job killed during its connect
        path = lambda kind, r: "/dev/shm/" + shm_ring.segment_name(os.getuid(), token, kind, r, pids[r])  # noqa: E731
        fwd_bytes = plan_capacity * 8 + max_tokens * dim * torch.tensor([], dtype=dtype).element_size()
        ret_bytes = (reply_ints + 1) * 8
        slots = lanes + 2  # a sender never has more than its lanes' steps (and the stop) unread: it never blocks
        made, ends = [], {}
        ok = True
        try:  # each rank creates what it receives
            if prev is not None:
                made.append(path("fwd", rank))
                ends["inbox"] = shm_ring.Channel(made[-1], fwd_bytes, slots, create=True)
            if rank == 0:
                made.append(path("ret", 0))
                ends["ret_in"] = shm_ring.Channel(made[-1], ret_bytes, slots, create=True)
        except Exception:  # noqa: BLE001 - any failure on any rank: every rank takes the process groups
            ok = False
        ok = all(everyone(ok))
        if ok:
            try:  # and opens what it sends into
                if nxt is not None:
                    ends["outbox"] = shm_ring.Channel(path("fwd", nxt), fwd_bytes, slots, create=False)
                if rank == last_leader:
                    ends["ret_out"] = shm_ring.Channel(path("ret", 0), ret_bytes, slots, create=False)
            except Exception:  # noqa: BLE001
                ok = False
            ok = all(everyone(ok))
        # every rank has voted after its last open: the names can go
        for p in made:
            try:
                os.unlink(p)
            except OSError:
                pass
        if not ok:
            for ch in ends.values():
                ch.close()
            return None
        peers = {"inbox": prev, "outbox": nxt, "ret_in": last_leader, "ret_out": 0}
        for key, ch in ends.items():
            ch.peer_pid = pids[peers[key]]
        return cls(dtype, dim, ends.get("inbox"), ends.get("outbox"), ends.get("ret_in"), ends.get("ret_out"))

    def post_plan(self) -> None:
        pass

    def recv_plan(self) -> tuple[StepPlan, torch.Tensor]:
        parts = self.inbox.recv()
        buf = parts[0].view(torch.int64)
        self._hidden = parts[1] if len(parts) > 1 else None
        return StepPlan.decode(buf), buf

    def recv_hidden(self, plan: StepPlan) -> torch.Tensor:
        hidden, self._hidden = self._hidden, None
        return hidden.view(self.dtype).view(plan.n_tokens, self.dim)

    def send_step(self, plan_buf: torch.Tensor, hidden: torch.Tensor | None) -> None:
        self.outbox.send([plan_buf] if hidden is None else [plan_buf, hidden])

    def send_tokens(self, tokens: torch.Tensor) -> None:
        self.ret_out.send([tokens.long()])

    def post_tokens(self, n: int) -> None:
        pass

    def take_tokens(self) -> list[int]:
        return self.ret_in.recv()[0].view(torch.int64).tolist()

    def finish(self) -> None:
        pass


def make_transport(kind: str, rank: int, pp: int, tp: int, device: torch.device, plan_capacity: int,
                   max_tokens: int, dim: int, dtype: torch.dtype, lanes: int, reply_ints: int | None = None):
    """The ring's transport (None at pp=1): ``infer.transport`` auto picks shared memory where every rank is a
    CPU process of one host, else the process groups; shm insists (an error where it cannot serve); backend
    always takes the process groups."""
    from framework.cli import UserError

    if pp == 1:
        return None
    if device.type == "cpu" and kind in ("auto", "shm"):
        t = ShmTransport.connect(rank, pp, tp, plan_capacity, max_tokens, reply_ints or max_tokens, dim, dtype, lanes)
        if t is not None:
            return t
        if kind == "shm":
            raise UserError("infer.transport=shm: some ranks cannot map a shared-memory segment (another host, or no "
                            "/dev/shm): use infer.transport=auto or backend")
    return Transport(rank, pp, device, plan_capacity, dim, dtype, tp=tp)
