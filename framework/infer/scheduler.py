"""The scheduler: continuous batching, decided at stage 0, carried to every stage with the step.

Running sequences are spread over lanes (one lane per micro-batch in flight around the pipeline ring; one lane
at pp=1). When a lane's previous step has come back, the scheduler builds its next step:

1. admit waiting requests into free KV slots while the lane holds fewer than its share of ``infer.max_batch``
   and the step's prefill budget lasts (``static`` admits a new group only once everything has finished);
2. one decode token for every row of the lane whose prompt is done;
3. prompt chunks of admitted rows, at most ``infer.prefill_chunk`` prompt tokens a round of the ring, so a long
   prompt never stalls the rows that decode beside it. With several lanes each lane's step gets an equal share
   of the budget: a round then prefills what one pp=1 step does, and the steps of successive lanes stay alike
   in size. A stage idles whenever the step it waits for is longer than the one it just ran (the first step
   fills the pipe alone), so at pp=2 one 512-token first step per lane left the second stage waiting ~80 ms,
   ~6% of a 128 x 48 job; shares of 256 halve that.

Sampled tokens come back in the step's order; finished rows leave and free their slots at once, and the next
step of the lane admits others into them. The pipe never drains between requests.

A sequence ends at any id of the EOS set (``generation_config.json``'s ``eos_token_id``, an int or a list, plus
the tokenizer's), at ``max_new_tokens``, or at a stop string. Stop strings are found incrementally (a
``StopScanner`` per sequence decodes each new token once and searches only the tail it can complete), and a
match cuts the token ids to those whose text lies before the stop string: token ids, text and usage agree.

Speculative decoding (framework/infer/speculative.py) is a decision of the same kind: a decode row may bring k draft
tokens as k extra decode rows of its slot at the next positions; the last stage samples every row, and ``complete``
keeps the drafts the target agrees with plus the target's own next token.

A step travels as a ``StepPlan`` (step.py): a few integer lists (slots, positions, chunk bounds, new rows' sampling
parameters, input token ids) encoded into one fixed-size int64 tensor, so that every stage can post the receive
for the next plan before it computes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from framework.infer.cache import SlotPool
from framework.infer.detok import StopScanner
from framework.infer.sampler import SamplingParams, unpack_logprobs
from framework.infer.speculative import Acceptance, SpecStats, accepted_prefix, choose_drafts
from framework.infer.step import StepPlan


@dataclass
class Request:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = 0.0


@dataclass
class Sequence:
    request: Request
    slot: int
    lane: int
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None  # the text cut at a stop string
    scanner: StopScanner | None = None  # for a request with stop strings
    t_first: float | None = None
    t_last: float | None = None
    t_done: float | None = None
    cancelled: bool = False
    logprobs: list = field(default_factory=list)  # per generated token: (logprob, [(id, logprob)] * k)
    prompt_logprobs: list = field(default_factory=list)  # per prompt token from the second: the same
    spec: SpecStats = field(default_factory=SpecStats)  # its speculative decoding: acceptance and counters
    spec_state: object | None = None  # the proposer's own state for this sequence

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)


class Scheduler:
    """Which sequences run in each lane's next step (stage 0 only)."""

    def __init__(self, n_slots: int, n_lanes: int, prefill_chunk: int, eos_ids: Iterable[int] = (), tokenizer=None,
                 policy: str = "continuous", max_len: int = 1 << 30, proposer=None, num_speculative_tokens: int = 0,
                 speculative_max_batch: int = 1 << 30, step_cost=None):
        if policy not in ("continuous", "static"):
            raise ValueError(f"unknown scheduling policy {policy}")
        self.lanes: list[list[Sequence]] = [[] for _ in range(n_lanes)]
        self.lane_cap = -(-n_slots // n_lanes)
        # each lane owns a block of slots, so its rows stay in consecutive slots
        self.pools = [SlotPool(range(min(i * self.lane_cap, n_slots), min((i + 1) * self.lane_cap, n_slots)))
                      for i in range(n_lanes)]
        self.in_flight = [False] * n_lanes
        self.waiting: deque[Request] = deque()
        self.eos_ids, self.tokenizer, self.policy = frozenset(eos_ids), tokenizer, policy
        self.lane_budget = -(-prefill_chunk // n_lanes)  # prompt tokens a lane's step may prefill
        self.max_len = max_len
        self._next = 0
        self.on_finish = None  # callback(seq) for front ends (progress bars, streaming)
        self.on_token = None  # callback(seq, token) after each new token (seq.generated may be cut already)
        # speculative decoding: who proposes drafts, at most how many a row, from how many decode rows none
        self.proposer, self.k_max, self.spec_max_batch = proposer, num_speculative_tokens, speculative_max_batch
        # the cost policy: a step's seconds against its rows (speculative.StepCost); None: the acceptance policy
        self.step_cost = step_cost
        # the engine's counters (server metrics, the generate summary); its estimate over its recent verifications,
        # which starts where a request's does but worth a single draft (so the first verifications move it), is
        # where a new request's starts
        self.spec = SpecStats(adapt=Acceptance(accepted=0.75, rejected=0.25, decay=0.9))
        self.spec_skipped_steps = 0  # steps that decoded without drafts: too many rows, or none worth its row
        # the cost policy's correction, learnt while serving with one lane (a step's wall time from schedule to the
        # end of complete, against the cost the policy predicted for it): steps with drafts and steps without, each
        # a decayed ratio. Measured costs are of the stage alone, on rows laid out evenly; inside the engine a
        # verification also brings the draft's catch-up, uneven slot runs, the sampler's rows and the bookkeeping
        # of accepted drafts (batch 4 on this CPU: steps with drafts took 1.3-1.5x their prediction, steps without
        # 1.0x). Their quotient scales a step with drafts in ``choose_drafts``
        self.cost_ratio = {True: 1.0, False: 1.0}
        self._timing: dict[int, tuple[bool, float, float]] = {}  # lane -> (drafts, predicted s, start of schedule)
        # and what the drafts it chose keep of what their estimates expected (a decayed ratio of sums): the policy
        # drafts for the requests whose recent acceptance looks high, and a high estimate is partly luck that
        # regresses (prompt lookup at batch 4 on code edits: 171-178 drafts expected kept a run, 134-144 kept)
        self.keep_ratio = 1.0
        self._keep_weight = 4.0  # the decayed sum of expected drafts behind keep_ratio (the prior: four drafts' worth)
        self._expected: dict[int, float] = {}  # lane -> drafts its step in flight is expected to keep

    # -- state --------------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def cancel(self, index: int) -> bool:
        """Drop a request (a client went away): a waiting one at once, a running one when its lane is next
        idle (its slot may still be in a step in flight). False when it is not known (already finished)."""
        for r in self.waiting:
            if r.index == index:
                self.waiting.remove(r)
                return True
        for lane in self.lanes:
            for s in lane:
                if s.request.index == index:
                    s.cancelled = True
                    return True
        return False

    def _drop_cancelled(self, lane: int) -> None:
        now = time.perf_counter()
        for s in self.lanes[lane]:
            if s.cancelled and s.finish_reason is None:
                s.finish_reason, s.t_done = "abort", now
                self.pools[s.lane].give(s.slot)
                if self.on_finish:
                    self.on_finish(s)
        self.lanes[lane] = [s for s in self.lanes[lane] if s.finish_reason is None]

    @property
    def running(self) -> int:
        return sum(len(lane) for lane in self.lanes)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.running > 0

    @property
    def free_slots(self) -> int:
        return sum(len(p) for p in self.pools)

    def _can_admit(self, lane: int) -> bool:
        if not self.waiting or not len(self.pools[lane]):
            return False
        return self.policy == "continuous" or self.running == 0  # static: a new group once everything left

    def next_lane(self) -> int | None:
        """An idle lane with something to do, round robin; None when every lane is busy or has nothing."""
        n = len(self.lanes)
        for i in range(n):
            lane = (self._next + i) % n
            if not self.in_flight[lane] and (self.lanes[lane] or self._can_admit(lane)):
                self._next = (lane + 1) % n
                return lane
        return None

    # -- decisions ----------------------------------------------------------------------------------------
    def schedule(self, lane: int) -> StepPlan | None:
        """The lane's next step (and the lane is then in flight), or None when cancellations left it nothing."""
        start = time.perf_counter()
        self._drop_cancelled(lane)
        plan = StepPlan(lane=lane)
        seqs = self.lanes[lane]
        budget = self.lane_budget
        if self.policy == "static" and self.running == 0 and self.waiting:
            self._admit_static_group()
        while self.policy == "continuous" and budget > sum(
                s.prompt_len - s.prefilled for s in seqs if s.prefilled < s.prompt_len) and self._can_admit(lane):
            req = self.waiting.popleft()
            seq = self._sequence(req, self.pools[lane].take(), lane)
            seqs.append(seq)
        chunks = []  # prompt chunks, oldest first, within the budget
        for s in seqs:
            if s.prefilled < s.prompt_len and budget > 0:
                chunks.append((s, min(s.prompt_len - s.prefilled, budget)))
                budget -= chunks[-1][1]
        # decode rows (prompt done, last token back), by slot: rows in consecutive slots read their cache as one view
        decoding = [s for s in sorted(seqs, key=lambda s: s.slot) if s.prefilled == s.prompt_len]
        drafts, predicted, expected = self._drafts(decoding, len(decoding) + sum(n for _, n in chunks))
        if predicted and not chunks and len(self.lanes) == 1:  # a decode-only step of the only lane: timed
            self._timing[lane] = (bool(drafts), predicted, start)
        if expected:
            self._expected[lane] = expected
        for s in decoding:
            # a finished row of a static group keeps being computed (its tokens dropped) at its last position
            pos = min(s.prompt_len + len(s.generated) - 1, self.max_len - 1)
            d = drafts.get(s.slot, [])
            plan.dec_slots.extend([s.slot] * (1 + len(d)))
            plan.dec_pos.extend(range(pos, pos + 1 + len(d)))
            plan.tokens.append(s.generated[-1])
            plan.tokens.extend(d)
        for s, n in chunks:
            p = s.request.params
            if s.prefilled == 0:
                plan.new_slots.append(s.slot)
                plan.new_params.append((p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.seed,
                                        p.top_logprobs))
            ends = s.prefilled + n == s.prompt_len
            plan.segs.append((s.slot, s.prefilled, n))
            plan.seg_sample.append(int(ends))
            plan.seg_next.append(-2 if p.prompt_logprobs is None else -1 if ends else
                                 s.request.prompt_ids[s.prefilled + n])
            plan.tokens.extend(s.request.prompt_ids[s.prefilled: s.prefilled + n])
        if not plan.tokens:
            return None
        self.in_flight[lane] = True
        return plan

    def _drafts(self, decoding: list[Sequence], rows: int) -> tuple[dict[int, list[int]], float, float]:
        """(draft tokens by slot, the step's predicted seconds and the drafts its estimates expect kept, under the
        cost policy, else 0 and 0) of the rows that speculate this step (which has ``rows`` rows without them): no
        more than each one's remaining tokens and cache room allow, as many as the policy finds worth verifying
        (speculative.py); none when the lane decodes too many rows."""
        if self.proposer is None or self.k_max < 1 or not decoding:
            return {}, 0.0, 0.0
        if len(decoding) >= self.spec_max_batch:
            self.spec_skipped_steps += 1
            return {}, 0.0, 0.0
        seqs, caps = [], []
        for s in decoding:
            p = s.request.params
            if s.finish_reason is not None or p.repetition_penalty != 1.0:
                continue
            pos = s.prompt_len + len(s.generated) - 1
            cap = min(self.k_max, p.max_new_tokens - len(s.generated) - 1, self.max_len - 1 - pos)
            if cap > 0:
                seqs.append(s)
                caps.append(cap)
        draft_cost = getattr(self.proposer, "step_cost", None)
        looked_up = None
        if getattr(self.proposer, "cheap", False):
            # a proposal that costs next to nothing (prompt lookup) is made first, so that the policy weighs the drafts
            # there are: a sequence whose lookup finds nothing is no candidate, and none of its rows is predicted
            looked_up = self.proposer.propose(seqs, caps)
            for s, d in zip(seqs, looked_up):
                if not d:
                    s.spec.adapt.declined()
            found = [i for i, d in enumerate(looked_up) if d]
            seqs, caps, looked_up = [seqs[i] for i in found], [len(looked_up[i]) for i in found], [looked_up[i] for i in found]
        if self.step_cost is None:
            ks = [s.spec.adapt.next_k(cap) for s, cap in zip(seqs, caps)]
        else:
            worth = [s.spec.adapt.worth(cap) for s, cap in zip(seqs, caps)]
            ks = choose_drafts(worth, rows, len(decoding), self.step_cost, draft_cost,
                               self.cost_ratio[True] / self.cost_ratio[False], self.keep_ratio)
        for s, k in zip(seqs, ks):
            if not k:
                s.spec.adapt.declined()
        chosen = [i for i, k in enumerate(ks) if k > 0]
        if not chosen:
            made = []
        elif looked_up is None:  # every candidate, those without drafts too (a draft model keeps them in step)
            made = self.proposer.propose(seqs, ks)
            made = [made[i] for i in chosen]
        else:
            made = [looked_up[i] for i in chosen]
        drafts = {seqs[i].slot: d[:ks[i]] for i, d in zip(chosen, made) if d}
        predicted = expected = 0.0
        if self.step_cost is not None:  # what the step is predicted to cost and to keep, to be compared with the real
            m, depth = sum(len(d) for d in drafts.values()), max((len(d) for d in drafts.values()), default=0)
            predicted = self.step_cost(rows + m) + (depth * draft_cost(len(drafts)) if draft_cost is not None and m else 0.0)
            # at each request's own estimate: a probe is weighed higher on purpose, and is no estimate's error
            expected = sum(seqs[i].spec.adapt.alpha ** j for i in chosen if seqs[i].slot in drafts
                           for j in range(1, len(drafts[seqs[i].slot]) + 1))
        if not drafts:
            self.spec_skipped_steps += 1
        return drafts, predicted, expected

    def _sequence(self, req: Request, slot: int, lane: int) -> Sequence:
        """A new running sequence; its acceptance estimate starts from the engine's recent one (the workload's
        acceptance, until its own verifications say otherwise)."""
        seq = Sequence(req, slot, lane)
        seq.spec.adapt = self.spec.adapt.prior()
        return seq

    def _admit_static_group(self) -> None:
        """Static batching (the baseline): the next group of requests, spread over the lanes, all at once."""
        while self.waiting and self.free_slots:
            for lane, pool in enumerate(self.pools):
                if self.waiting and len(pool):
                    self.lanes[lane].append(self._sequence(self.waiting.popleft(), pool.take(), lane))

    def _slot_top(self, plan: StepPlan) -> dict[int, int]:
        """Alternatives each slot of the lane's step asks for (-1: none)."""
        return {s.slot: s.request.params.top_logprobs for s in self.lanes[plan.lane]}

    def reply_len(self, plan: StepPlan) -> int:
        """Ints the last stage returns for the step: a token per sampled row, then ``token_logprobs`` rows (1 + 2k
        ints) for the sampled rows that want log-probabilities and for the scored prompt rows."""
        top = self._slot_top(plan)
        slots, _ = plan.sample_slots_positions()
        n = len(slots) + sum(1 + 2 * top[s] for s in slots if top[s] >= 0)
        return n + sum(1 + 2 * top[s] for s in plan.score_rows()[2])

    def complete(self, plan: StepPlan, reply: list[int]) -> None:
        """The lane's step came back: one sampled token per sampled row (plan order), then the log-probability
        rows ``reply_len`` counts."""
        now = time.perf_counter()
        seqs = {s.slot: s for s in self.lanes[plan.lane]}
        top = self._slot_top(plan)
        sample_slots, _ = plan.sample_slots_positions()
        it = iter(reply[len(sample_slots):])

        def take(slot: int):
            k = top[slot]
            row = [next(it) for _ in range(1 + 2 * k)]
            return unpack_logprobs(row, k)

        # (token, log-probabilities or None) of every sampled row, in row order
        drawn = [(tok, take(slot) if top[slot] >= 0 else None) for slot, tok in zip(sample_slots, reply)]
        kept = 0
        for slot in plan.score_rows()[2]:
            seqs[slot].prompt_logprobs.append(take(slot))
        for slot, first, rows in plan.dec_groups():
            seq = seqs[slot]
            if seq.finish_reason is not None:
                continue
            # the drafts are kept while they equal the target's own token at their row (speculative.py says why
            # that is the rejection sampler), then the target's token after the last kept one
            keep = accepted_prefix(plan.tokens[first + 1: first + rows], [t for t, _ in drawn[first: first + rows - 1]])
            if rows > 1:
                seq.spec.record(keep, rows - 1)
                self.spec.record(keep, rows - 1)
                kept += keep
            for tok, lp in drawn[first: first + keep + 1]:
                self._append(seq, tok, now, lp)
                if seq.finish_reason is not None:
                    break
        n_dec = len(plan.dec_slots)
        for (slot, start, length), s in zip(plan.segs, plan.seg_sample):
            seq = seqs[slot]
            seq.prefilled = start + length
            if s:
                tok, lp = drawn[n_dec]
                n_dec += 1
                self._append(seq, tok, now, lp)
        if self.policy == "static":  # the group leaves together, once its slowest row is done
            if all(s.finish_reason is not None for lane in self.lanes for s in lane) and not any(
                    f for i, f in enumerate(self.in_flight) if i != plan.lane):
                for i, lane in enumerate(self.lanes):
                    for s in lane:
                        self.pools[i].give(s.slot)
                    self.lanes[i] = []
        else:
            self.lanes[plan.lane] = [s for s in self.lanes[plan.lane] if s.finish_reason is None]
        self._drop_cancelled(plan.lane)
        self.in_flight[plan.lane] = False
        self._learn_cost(plan.lane)
        self._learn_keep(plan.lane, kept)

    COST_DECAY = 0.9  # weight of the ratio so far at each timed step
    COST_RELAX = 0.99  # a ratio not measured for a step moves this much less away from 1 (so that a policy that
    # stopped verifying after a slow spell tries again, ~1/(1 - 0.99) steps later)

    def _learn_cost(self, lane: int) -> None:
        """Fold a timed step's wall time over its prediction into ``cost_ratio`` (within 0.5-3x: a hiccup of the
        host is not a cost)."""
        timing = self._timing.pop(lane, None)
        if timing is None:
            return
        drafts, predicted, start = timing
        ratio = min(max((time.perf_counter() - start) / predicted, 0.5), 3.0)
        r = self.cost_ratio
        r[drafts] = self.COST_DECAY * r[drafts] + (1 - self.COST_DECAY) * ratio
        r[not drafts] = 1.0 + self.COST_RELAX * (r[not drafts] - 1.0)

    KEEP_DECAY = 0.95  # weight of the sums so far at each step with drafts

    def _learn_keep(self, lane: int, kept: int) -> None:
        """Fold a step's kept drafts against what the policy expected of them into ``keep_ratio``: decayed sums of
        both, their quotient within 0.25-1.5 (a ratio of sums, so that a step expecting little moves it little). A
        step without drafts relaxes the ratio towards 1 as ``_learn_cost`` does, so that drafts it priced out are
        tried again."""
        if self.proposer is None:
            return
        expected = self._expected.pop(lane, 0.0)
        if expected:  # the kept sum is keep_ratio times the expected one (clamped: the sums hold the ratio used)
            weight = self.KEEP_DECAY * self._keep_weight
            ratio = (weight * self.keep_ratio + kept) / (weight + expected)
            self._keep_weight = weight + expected
        else:
            ratio = 1.0 + self.COST_RELAX * (self.keep_ratio - 1.0)
        self.keep_ratio = min(max(ratio, 0.25), 1.5)

    def _append(self, seq: Sequence, tok: int, now: float, logprob=None) -> None:
        p = seq.request.params
        seq.generated.append(tok)
        if p.logprobs is not None:
            seq.logprobs.append(logprob)
        seq.t_first = seq.t_first or now
        seq.t_last = now
        if tok in self.eos_ids and not p.ignore_eos:
            seq.finish_reason = "stop"
        elif p.stop and self.tokenizer is not None:
            if seq.scanner is None:
                seq.scanner = StopScanner(self.tokenizer, p.stop)
            if seq.scanner.push(tok):
                keep, seq.text = seq.scanner.cut
                del seq.generated[keep:]
                del seq.logprobs[keep:]
                seq.finish_reason = "stop"
        if seq.finish_reason is None and len(seq.generated) >= p.max_new_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            seq.scanner = None
        if self.on_token:
            self.on_token(seq, tok)
        if seq.finish_reason is not None:
            seq.t_done = now
            if self.policy == "continuous":
                self.pools[seq.lane].give(seq.slot)
            if self.on_finish:
                self.on_finish(seq)
