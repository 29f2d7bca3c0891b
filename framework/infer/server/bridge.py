"""Between the HTTP event loop and the engine loop: requests in, tokens and finishes out.

Two threads of rank 0 meet here. The event loop (uvicorn's thread) submits and cancels through a thread-safe
inbox; the engine (the main thread, the only one that calls torch.distributed) drains the inbox in its
``poll`` hook between steps, which is where the scheduler admits new requests: continuous batching across HTTP
requests. The scheduler's token and finish callbacks run in the engine thread; they are batched and handed to
the event loop once per poll (``call_soon_threadsafe``), where each choice's text is detokenized incrementally
and pushed to its HTTP request's queue.

Life cycle: ``draining`` (SIGTERM) refuses new work and lets the engine stop once idle; ``dead`` (a rank died)
fails every open request with 503 and refuses the rest.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import time
from dataclasses import dataclass, field

from framework.infer.detok import IncrementalText
from framework.infer.sampler import SamplingParams
from framework.infer.scheduler import Request
from framework.infer.server.metrics import ServerMetrics
from framework.infer.server.protocol import APIError


@dataclass
class Event:
    """What a choice of an HTTP request receives: text so far sent on, then one finish (or an error)."""

    choice: int
    text: str = ""
    finish_reason: str | None = None
    n_tokens: int = 0
    error: APIError | None = None
    token_ids: list[int] = field(default_factory=list)  # the tokens behind ``text`` (all of them at a finish)
    logprobs: list | None = None  # their (logprob, top) entries, when the request asked for logprobs
    prompt_logprobs: list | None = None  # the prompt's entries (prompt_logprobs), on a choice's first event
    drafts: tuple[int, int] | None = None  # at a finish when the engine speculated: (kept, verified) draft tokens


@dataclass
class Job:
    """One choice of one HTTP request, as one engine request."""

    index: int
    choice: int
    prompt_len: int
    params: SamplingParams
    arrival: float
    out: asyncio.Queue
    detok: IncrementalText | None  # streaming only
    done: bool = False
    pending: list = field(default_factory=list)  # streaming: (token, logprob entry) whose text is not out yet
    sent_tokens: int = 0  # streaming: tokens whose entries went out with a text delta
    prompt_lp: list | None = None  # prompt_logprobs, until the choice's first event carries them


@dataclass
class Handle:
    """An HTTP request's jobs and the queue their events arrive on."""

    jobs: list[Job]
    out: asyncio.Queue
    finished: int = 0
    results: dict = field(default_factory=dict)  # choice -> Event (the finish)

    @property
    def complete(self) -> bool:
        return self.finished == len(self.jobs)


class EngineBridge:
    IDLE_WAIT_S = 0.5  # the engine's longest sleep when idle; any submission wakes it at once

    def __init__(self, scheduler, tokenizer, metrics: ServerMetrics, slots: int, max_queue: int):
        self.sched, self.tok, self.metrics = scheduler, tokenizer, metrics
        self.slots, self.max_queue = slots, max_queue
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.jobs: dict[int, Job] = {}  # event-loop side: open jobs by engine index
        self.outstanding = 0  # event-loop side: jobs submitted and not finished
        self._ids = itertools.count()
        self._events: list[tuple] = []  # engine side: callbacks of the current step, not yet handed over
        self.draining = False
        self.dead: str | None = None
        scheduler.on_token = self._on_token
        scheduler.on_finish = self._on_finish

    # -- engine thread -------------------------------------------------------------------------------------
    def _on_token(self, seq, token: int) -> None:
        p = seq.request.params
        lp = seq.logprobs[-1] if p.logprobs is not None and seq.logprobs and seq.generated[-1:] == [token] else None
        first = list(seq.prompt_logprobs) if p.prompt_logprobs is not None and len(seq.generated) == 1 else None
        self._events.append(("token", seq.request.index, token, seq.finish_reason is not None, lp, first))

    def _on_finish(self, seq) -> None:
        self._events.append(("finish", seq.request.index, seq))

    def flush(self) -> None:
        """Hand the callbacks gathered since the last flush to the event loop."""
        if self._events and self.loop is not None:
            events, self._events = self._events, []
            self.to_loop(self._deliver, events)

    def to_loop(self, fn, *args) -> None:
        """Run fn(*args) in the event loop's thread; nothing when the loop has ended (the HTTP side stopped,
        so no one is left to answer)."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed
            pass

    def poll(self, idle: bool) -> bool:
        """The engine's hook before each scheduling decision: add and cancel requests; block briefly when idle.
        False (stop once the work held is done) when draining and idle."""
        self.flush()
        s = self.sched
        self.metrics.observe_engine(s.running, len(s.waiting), s.free_slots)
        if s.proposer is not None:
            self.metrics.observe_spec(s.spec, s.spec_skipped_steps)
        took, first = False, True
        while True:
            try:
                block = idle and first and not self.draining
                item = self.inbox.get(timeout=self.IDLE_WAIT_S) if block else self.inbox.get_nowait()
            except queue.Empty:
                break
            first = False
            if item is None:  # a wake-up
                continue
            took = True
            kind, x = item
            if kind == "add":
                self.sched.add(x)
            else:
                was_waiting = any(r.index == x for r in self.sched.waiting)
                if self.sched.cancel(x) and was_waiting:  # gone at once: no finish callback comes for it
                    self._events.append(("aborted", x))
        if took:
            self.metrics.observe_engine(s.running, len(s.waiting), s.free_slots)
            self.flush()
        return not (self.draining and idle and not took and not s.has_work())

    def wake(self) -> None:
        self.inbox.put(None)

    # -- event loop ----------------------------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], params: list[SamplingParams], stream: bool,
               arrival: float) -> Handle:
        """One job per (prompt, params) pair, in choice order; raises APIError 503 or 429."""
        if self.dead:
            raise APIError(503, f"the server is down: {self.dead}")
        if self.draining:
            raise APIError(503, "the server is shutting down")
        if self.outstanding + len(prompts) > self.slots + self.max_queue:
            raise APIError(429, f"the queue is full ({self.outstanding} requests in the server): retry later",
                           headers={"Retry-After": "1"})
        out: asyncio.Queue = asyncio.Queue()
        jobs = []
        for choice, (ids, p) in enumerate(zip(prompts, params)):
            job = Job(next(self._ids), choice, len(ids), p, arrival, out,
                      IncrementalText(self.tok, p.stop) if stream else None)
            self.jobs[job.index] = job
            jobs.append(job)
            self.metrics.prompt_tokens.inc(len(ids))
            self.inbox.put(("add", Request(job.index, list(ids), p, arrival=arrival)))
        self.outstanding += len(jobs)
        return Handle(jobs, out)

    def cancel(self, handle: Handle) -> None:
        """The client went away: every unfinished job leaves the engine (its slot is freed)."""
        for job in handle.jobs:
            if not job.done and not self.dead:
                self.inbox.put(("cancel", job.index))

    def _deliver(self, events: list[tuple]) -> None:
        for ev in events:
            job = self.jobs.get(ev[1])
            if job is None:
                continue
            if ev[0] == "token":
                if ev[5] is not None:
                    job.prompt_lp = ev[5]
                if job.detok is not None and not ev[3]:  # the last token's text comes with the finish
                    job.pending.append((ev[2], ev[4]))
                    text = job.detok.push(ev[2])
                    if text:
                        job.out.put_nowait(self._delta(job, text))
                continue
            self._close(job)
            if ev[0] == "aborted":
                self.metrics.observe_finish("abort", 0, job.arrival, None, None, time.perf_counter())
                job.out.put_nowait(Event(job.choice, finish_reason="abort"))
                continue
            seq = ev[2]
            full = seq.text if seq.text is not None else self.tok.decode(seq.generated, skip_special_tokens=True)
            text = job.detok.finish(full) if job.detok is not None else full
            n = len(seq.generated)
            self.metrics.observe_finish(seq.finish_reason, n, job.arrival, seq.t_first, seq.t_last, seq.t_done)
            wants = seq.request.params.logprobs is not None
            start = job.sent_tokens if job.detok is not None else 0  # streamed: what no delta carried yet
            job.out.put_nowait(Event(job.choice, text, seq.finish_reason, n, token_ids=seq.generated[start:],
                                     logprobs=seq.logprobs[start:] if wants else None,
                                     prompt_logprobs=self._take_prompt_lp(job, seq),
                                     drafts=(seq.spec.accepted, seq.spec.proposed) if seq.spec.proposed else None))

    def _delta(self, job: Job, text: str) -> Event:
        """A streamed text delta with the tokens (and their entries) it completes."""
        ids, lps = [t for t, _ in job.pending], [lp for _, lp in job.pending]
        job.pending, job.sent_tokens = [], job.sent_tokens + len(ids)
        wants = job.params.logprobs is not None
        return Event(job.choice, text, token_ids=ids, logprobs=lps if wants else None,
                     prompt_logprobs=self._take_prompt_lp(job, None))

    @staticmethod
    def _take_prompt_lp(job: Job, seq) -> list | None:
        """The prompt's entries, on the first event of a choice that asked for them (then never again)."""
        if job.params.prompt_logprobs is None or job.prompt_lp == []:
            return None
        out = job.prompt_lp if job.prompt_lp is not None else list(seq.prompt_logprobs) if seq is not None else None
        if out is not None:
            job.prompt_lp = []
        return out

    def _close(self, job: Job) -> None:
        job.done = True
        self.jobs.pop(job.index, None)
        self.outstanding -= 1

    def fail_all(self, reason: str) -> None:
        """A rank died: every open job gets a 503, and so does every later request (event loop)."""
        self.dead = reason
        err = APIError(503, f"the server is down: {reason}")
        for job in list(self.jobs.values()):
            self._close(job)
            job.out.put_nowait(Event(job.choice, error=err))
