"""Speculative decoding: proposers of draft tokens, and the per-request choice of how many to verify.

A speculating decode row brings its draft tokens into the step as extra decode rows of its own slot, at the
positions after its input token (``Scheduler.schedule``): every stage runs them like any other rows, writing their
keys and values, and each row attends to its slot's cache up to its own position, so a draft row sees the drafts
before it. The last stage samples every row as usual (greedy, or the Gumbel-max draw from the hashed noise of the
row's (seed, position)), and ``Scheduler.complete`` keeps the drafts while they equal what the target drew at their
row, then the target's token at the first row that differs (or the bonus token after the last draft).

Why that is exact: every token a verification emits is the target's own draw at its row (greedy: its argmax;
sampled: the Gumbel-max draw with the hashed noise of the request's (seed, position), as without speculation), and
a row's draw counts only while every draft before it was kept, i.e. while the row's prefix is the real text. So a
request gets exactly the tokens it gets without speculation, whatever shares its batch, and the distribution is
the target's. For a proposal that does not depend on the target's noise (prompt lookup) this is the rejection
sampler with a point-mass q on the proposed x: the draw equals x with probability min(1, p(x) / q(x)) = p(x), and
otherwise it is a draw from the normalised residual max(0, p - q), which is p without x
(tests/unit/test_speculative.py: chi-square against p with deliberately bad drafts, and the acceptance rate
against the textbook sampler's). Rejected positions of the static KV cache are simply written again by the next
step, which only ever attends up to its own positions.

The draft model draws its proposal with the very noise the target will use at that position, after the request's
temperature, top-k and top-p (a coupled draw): where the draft's distribution is close to the target's the two
draws coincide (always, for an identical model), so sampled requests keep most of the acceptance a greedy one gets,
which a draft's argmax would lose at high temperature.

How many drafts a step verifies (``infer.speculative_policy``):
- ``cost`` (the default): each request keeps a running estimate of its per-token acceptance alpha
  (``Acceptance``), so its j-th draft is worth alpha^j expected tokens; the engine measured at load what a step
  costs against its rows on this machine (``StepCost``: the target's stage, and the draft model's step), and each
  step takes the drafts, most valuable first, that maximise its expected tokens a second, counting the rows the
  step already has (decode rows and prompt tokens). Where rows are nearly free (a step bound by reading the
  weights: batch 1, a GPU) every row verifies up to k; where a step is bound by compute (large batches on a CPU)
  only drafts likely enough to be kept are worth their row, and none at all for a batch of poor acceptance.
- ``acceptance``: k is one more than the request's expected run of accepted drafts, whatever a row costs.
Under both, a step whose lane decodes ``infer.speculative_max_batch`` rows or more adds no drafts, and a request
whose drafts keep being refused gets a one-draft probe now and then (so that text turning repetitive is noticed).
Requests with a repetition penalty do not speculate (a draft row's penalty would need the drafts before it among
the tokens it has seen).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

import torch

from framework.cli import UserError


@dataclass
class Acceptance:
    """A request's running acceptance: decayed sums of accepted drafts and of rejections (a verification that
    rejected a draft). Under a constant per-token acceptance alpha, accepted / rejections estimates
    alpha / (1 - alpha), the mean run of accepted drafts before a rejection."""

    accepted: float = 3.0  # optimistic start: the first verification asks for the most drafts
    rejected: float = 1.0
    decay: float = 0.7
    idle: int = 0  # steps since the last verification while the estimate says drafts are hopeless

    MIN_RUN = 0.1  # below ~9% acceptance a draft row costs more than it returns:
    PROBE_EVERY = 8  # steps without a verification after which a request probes one draft (text may turn repetitive)

    PROBE_ALPHA = 0.5  # what a probe is weighed at under the cost policy

    def update(self, accepted: int, proposed: int) -> None:
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (1.0 if accepted < proposed else 0.0)
        self.idle = 0

    def prior(self, weight: float = 4.0) -> Acceptance:
        """A new request's estimate: this one's acceptance, worth ``weight`` drafts of evidence (as the optimistic
        start, 3 accepted and 1 rejection, is)."""
        return Acceptance(accepted=weight * self.alpha, rejected=weight * (1.0 - self.alpha))

    @property
    def alpha(self) -> float:
        """Per-token acceptance: each draft verified is a trial until the first rejection, so accepted / (accepted
        + rejections) is its maximum-likelihood estimate."""
        return self.accepted / (self.accepted + self.rejected)

    @property
    def run(self) -> float:
        """The expected accepted run before a rejection (accepted drafts per rejection)."""
        return self.accepted / max(self.rejected, 1e-6)

    def worth(self, k_max: int) -> tuple[float, int]:
        """(acceptance, most drafts) the cost policy weighs this request's drafts at this step: its estimate and
        k_max; none while hopeless; and once PROBE_EVERY steps have gone by without a verification (declined by
        the policy, or hopeless), one probe draft weighed at least PROBE_ALPHA, so that an estimate the policy
        stopped verifying is measured again (the text may have turned repetitive)."""
        if self.idle >= self.PROBE_EVERY:
            return max(self.alpha, self.PROBE_ALPHA), 1
        return (0.0, 0) if self.run < self.MIN_RUN else (self.alpha, k_max)

    def declined(self) -> None:
        """This request got no draft this step (either policy)."""
        self.idle += 1

    def next_k(self, k_max: int) -> int:
        """The acceptance policy: one more draft than the expected accepted run, within 1..k_max; 0 while
        acceptance is hopeless, but for a one-draft probe once PROBE_EVERY steps went by without a verification."""
        if self.idle >= self.PROBE_EVERY:
            return 1
        run = self.run
        return 0 if run < self.MIN_RUN else max(1, min(k_max, int(run) + 1))


@dataclass
class SpecStats:
    """Counters of one request or of the whole engine."""

    proposed: int = 0  # draft tokens verified
    accepted: int = 0  # of them kept
    steps: int = 0  # verifications (decode rows that carried drafts)
    adapt: Acceptance = field(default_factory=Acceptance)

    def record(self, accepted: int, proposed: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        self.steps += 1
        self.adapt.update(accepted, proposed)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens a verification emits on average: the accepted drafts and the target's own token."""
        return (self.accepted + self.steps) / self.steps if self.steps else None


ROW_GRID = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512)


class StepCost:
    """Seconds of a step against its rows: measured at load for the row counts of ROW_GRID up to the most a step
    can have (``measure``), linear between them and past the last, made nondecreasing by the lower envelope (each
    count's time is at most any larger count's): noise only ever slows a step, and holding later counts at a slow
    spike instead (the upper envelope, before) made every count after it look free (batch 4 on this VM: 5-12 rows
    all at 5 rows' spiked 13.4 ms)."""

    def __init__(self, rows: list[int], secs: list[float]):
        self.rows, self.secs = list(rows), list(secs)
        for i in range(len(self.secs) - 2, -1, -1):
            self.secs[i] = min(self.secs[i], self.secs[i + 1])

    @classmethod
    def measure(cls, worker, max_rows: int) -> StepCost:
        rows = sorted({r for r in ROW_GRID if r < max_rows} | {max(1, max_rows)})
        return cls(rows, worker.time_rows(rows))

    def __call__(self, r: float) -> float:
        rows, secs = self.rows, self.secs
        if len(rows) == 1:
            return secs[0] * max(r, 1) / rows[0]
        i = min(max(bisect_left(rows, r), 1), len(rows) - 1)  # the segment holding r (the last one past it)
        r0, r1, t0, t1 = rows[i - 1], rows[i], secs[i - 1], secs[i]
        return max(t0 + (t1 - t0) * (r - r0) / (r1 - r0), secs[0])


def choose_drafts(worth: list[tuple[float, int]], base_rows: int, base_tokens: float, cost: StepCost,
                  draft_cost: StepCost | None = None, scale: float = 1.0, keep: float = 1.0) -> list[int]:
    """How many drafts each candidate verifies this step (the cost policy): ``worth[i]`` is (alpha, most drafts)
    of candidate i, whose j-th draft is worth alpha^j expected tokens and costs a row; a step already has
    ``base_rows`` rows and emits ``base_tokens`` tokens without drafts. Drafts are taken most valuable first, and
    the step keeps the number of them whose expected tokens a second (step cost, plus the draft model's steps:
    the deepest draft's count of steps over the candidates that draft) is highest; ``scale``: what a step with drafts
    takes over its predicted cost, relative to a step without (the scheduler's ``cost_ratio``); ``keep``: what the
    drafts chosen keep of what their estimates expected (the scheduler's ``keep_ratio``), which scales every gain."""
    cands = sorted(((a ** j, i, j) for i, (a, k) in enumerate(worth) if a > 0 for j in range(1, k + 1)),
                   key=lambda c: -c[0])
    best_m, best = 0, base_tokens / cost(base_rows)
    tokens, depth, seqs = base_tokens, 0, set()
    for m, (gain, i, j) in enumerate(cands, 1):
        tokens += keep * gain
        depth = max(depth, j)
        seqs.add(i)
        t = scale * (cost(base_rows + m) + (depth * draft_cost(len(seqs)) if draft_cost is not None else 0.0))
        if tokens / t > best:
            best_m, best = m, tokens / t
    ks = [0] * len(worth)
    for _, i, j in cands[:best_m]:
        ks[i] = max(ks[i], j)
    return ks


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (whole-list compare first: the usual case)."""
    m = min(len(a), len(b))
    if a[:m] == b[:m]:
        return m
    n = 0
    while a[n] == b[n]:
        n += 1
    return n


def accepted_prefix(drafts: list[int], drawn: list[int]) -> int:
    """How many drafts are kept: the longest prefix where each draft equals the token the target drew at the row
    before it (``drawn[j]`` is the target's token for the position of ``drafts[j]``)."""
    return common_prefix(drafts, drawn)


class NgramProposer:
    """Prompt lookup: the sequence's last n tokens (n from ngram_max down to ngram_min) are looked up among its
    earlier tokens (prompt and output); the k tokens that followed their latest earlier occurrence are the draft
    (transformers' ``prompt_lookup_num_tokens`` and vLLM's ngram proposer do the same lookup).
    Each sequence keeps an index of its n-grams, extended with the tokens added since its last lookup."""

    cheap = True  # the scheduler looks drafts up before its policy weighs them (a lookup costs microseconds)

    def __init__(self, ngram_min: int, ngram_max: int):
        if not 1 <= ngram_min <= ngram_max:
            raise UserError(f"infer.ngram_min={ngram_min}, infer.ngram_max={ngram_max}: use 1 <= ngram_min <= ngram_max")
        self.ngram_min, self.ngram_max = ngram_min, ngram_max

    def propose(self, seqs: list, ks: list[int]) -> list[list[int]]:
        return [self._lookup(s, k) for s, k in zip(seqs, ks)]

    def _lookup(self, seq, k: int) -> list[int]:
        ctx = seq.request.prompt_ids + seq.generated
        state = seq.spec_state
        if state is None:
            state = seq.spec_state = {"index": {}, "upto": 0}
        index = state["index"]
        # n-grams that end before the last token (each has a continuation); the latest occurrence wins
        for end in range(max(state["upto"], 1), len(ctx)):
            for n in range(self.ngram_min, min(self.ngram_max, end) + 1):
                index[tuple(ctx[end - n: end])] = end - n
        state["upto"] = max(len(ctx), 1)
        L = len(ctx)
        for n in range(min(self.ngram_max, L), self.ngram_min - 1, -1):
            start = index.get(tuple(ctx[L - n:]))
            if start is not None:
                # the text after the match, read on into the draft itself where the match is so close to the end
                # that fewer than k tokens follow it: a periodic run (a repeated line, spaces) continues its period
                out: list[int] = []
                for i in range(start + n, start + n + k):
                    out.append(ctx[i] if i < L else out[i - L])
                return out
        return []


class DraftProposer:
    """A small model with the target's tokenizer, run on rank 0 with a KV cache of its own (one slot per target
    slot): a step feeds each sequence that drafts the tokens the draft cache does not hold yet (and those that do
    not draft this step, where they are close behind) and draws the first draft (argmax, or the coupled draw of a
    sampled request: ``_draw``), then k - 1 one-row decode steps continue the draft. Each
    sequence remembers which tokens the draft cache holds; a draft the target rejected is written over on the next
    catch-up. The draft's decode steps run compiled by default (``infer.draft_compile``): a draft small enough to
    pay costs, eager, its Python and kernel launches rather than its weights (2-layer 64-wide draft, one row on
    this project's CPU: 0.48 ms eager, 0.23 ms compiled), and a proposal is k of its steps."""

    def __init__(self, worker, step_cost: StepCost | None = None):
        self.worker = worker  # a StageWorker holding the whole draft model
        self.step_cost = step_cost  # its step's seconds against rows (the cost policy counts them)

    # a sequence this few tokens behind the draft cache catches up in decode rows (compiled); more, in a prompt
    # segment (eager: ~2-3 ms for a 4-layer draft here). 16 covers a request the policy declined for a while and
    # then probes (Acceptance.PROBE_EVERY = 8 steps, each one or more tokens)
    CATCH_UP_ROWS = 16

    @torch.inference_mode()
    def propose(self, seqs: list, ks: list[int]) -> list[list[int]]:
        """Each sequence's ks[i] drafts; a sequence with k = 0 gets none, but where it is only a few tokens behind
        the draft cache it catches up in the same step (a few more rows of a step that runs anyway), so that a
        request the policy declines now and then does not fall so far behind that its next proposal needs an eager
        prompt segment."""
        from framework.infer.step import StepPlan

        if not any(ks):
            return [[] for _ in seqs]
        ctxs = [s.request.prompt_ids + s.generated for s in seqs]
        plan, fed, rows = self._catch_up(seqs, ctxs, ks)
        logits = self.worker.step(plan, None)
        if rows != list(range(logits.shape[0])):  # segments' rows come after every decode row
            logits = logits[torch.tensor(rows, device=logits.device)]
        drafts: list[list[int]] = [[] for _ in seqs]
        for i, t in zip(fed, self._draw(logits, [seqs[i] for i in fed], [len(ctxs[i]) for i in fed])):
            seqs[i].spec_state = list(ctxs[i])
            if ks[i]:
                drafts[i].append(t)
        live = [i for i, k in enumerate(ks) if k > 1]
        while live:
            step = StepPlan(dec_slots=[seqs[i].slot for i in live],
                            dec_pos=[len(seqs[i].spec_state) for i in live], tokens=[drafts[i][-1] for i in live])
            nxt = self._draw(self.worker.step(step, None), [seqs[i] for i in live],
                             [len(seqs[i].spec_state) + 1 for i in live])
            for i, t in zip(live, nxt):
                seqs[i].spec_state.append(drafts[i][-1])
                drafts[i].append(t)
            live = [i for i in live if len(drafts[i]) < ks[i]]
        return drafts

    def _catch_up(self, seqs: list, ctxs: list[list[int]], ks: list[int]):
        """The step that feeds each sequence the tokens its draft cache lacks (at least the last one: its logits
        give the first draft). A verification leaves a sequence one or two tokens behind: those are decode rows of
        its slot (the compiled step, when every sequence is so close); a new one (or one far behind) is a prompt
        segment, whose step runs eagerly, left out for a sequence that wants no drafts (k = 0). Returns the plan,
        the sequences it feeds, and for each of them the row of its logits."""
        from framework.infer.step import StepPlan

        plan, segs, dec_last = StepPlan(), [], {}
        for i, (s, ctx) in enumerate(zip(seqs, ctxs)):
            common = common_prefix(s.spec_state or [], ctx[:-1])
            if common and len(ctx) - common <= self.CATCH_UP_ROWS:
                plan.dec_slots.extend([s.slot] * (len(ctx) - common))
                plan.dec_pos.extend(range(common, len(ctx)))
                plan.tokens.extend(ctx[common:])
                dec_last[i] = len(plan.dec_slots) - 1
            elif ks[i]:
                segs.append((i, common))
        seg_row = {}
        for i, common in segs:
            plan.segs.append((seqs[i].slot, common, len(ctxs[i]) - common))
            plan.seg_sample.append(1)
            plan.seg_next.append(-2)
            plan.tokens.extend(ctxs[i][common:])
            seg_row[i] = len(plan.dec_slots) + len(seg_row)  # sampled rows: every decode row, then the segments'
        fed = [i for i in range(len(seqs)) if i in dec_last or i in seg_row]
        return plan, fed, [dec_last[i] if i in dec_last else seg_row[i] for i in fed]

    def _draw(self, logits: torch.Tensor, seqs: list, positions: list[int]) -> list[int]:
        """The draft's token for each row: its argmax for a greedy request, else its draw with the request's
        parameters and the target's noise for that position (sampler.sample)."""
        from framework.infer.sampler import sample

        params = [s.request.params for s in seqs]
        if all(p.temperature <= 0 for p in params):
            return logits.argmax(-1).tolist()
        dev = logits.device
        return sample(logits.float(), torch.tensor([p.temperature for p in params], device=dev),
                      torch.tensor([p.top_k for p in params], device=dev), torch.tensor([p.top_p for p in params], device=dev),
                      torch.tensor([p.seed for p in params], device=dev), torch.tensor(positions, device=dev)).tolist()


def load_draft_proposer(draft_dir: str, target_tokenizer, n_slots: int, max_len: int, device: torch.device,
                        dtype: torch.dtype, compiled: bool = True, max_seqs: int | None = None,
                        measure: bool = False) -> DraftProposer:
    """The draft model, whole, on this rank (rank 0, beside stage 0), with a KV cache of ``n_slots`` slots.
    ``compiled``: its decode steps are torch.compile'd, built here at load (DraftProposer says why), for steps of
    up to ``max_seqs`` speculating sequences (default: every slot). ``measure``: its step cost is timed too."""
    from framework.checkpoint.resolve import resolve_model_dir
    from framework.data.tokenizer import load_tokenizer
    from framework.infer.cache import KVCache
    from framework.infer.loader import load_stage, read_model_args
    from framework.infer.plan import plan_stages
    from framework.infer.worker import StageWorker

    model_dir, export_from = resolve_model_dir(draft_dir)
    if export_from is not None:
        raise UserError(f"infer.draft_model_dir={draft_dir} has no export: run `python -m framework.export "
                        f"checkpoint={export_from}` first")
    tok = load_tokenizer(model_dir)
    if tok.get_vocab() != target_tokenizer.get_vocab():
        raise UserError(f"infer.draft_model_dir={draft_dir}: its tokenizer is not the target's; a draft must use the "
                        f"target's tokenizer (train it with trainer.distill_from=<target>)")
    args = read_model_args(model_dir)
    stage = plan_stages(args, 1, None, torch.tensor([], dtype=dtype).element_size())[0]
    # laid out for one-row steps (cpu_linear.relaid): compiled, a proposal's one-row steps are inductor's own
    # reductions and its catch-up rows this project's kernel, not a BLAS call per linear (eager: the kernel). With
    # the BLAS calls (17 a step) the draft's steps inside the engine took 2-4x their load-time time and the target's
    # next step slowed too; see docs/engine.md, "The draft's products"
    weights = load_stage(model_dir, args, stage, device, dtype, rows_hint=1, compiled=compiled)
    cache = KVCache(stage.layers, n_slots, args.kv_heads, max_len, args.head_dim, dtype, device)
    seqs = min(n_slots, max_seqs or n_slots)
    worker = StageWorker(weights, cache, device, dtype, compile_decode=compiled,
                         max_rows=seqs * DraftProposer.CATCH_UP_ROWS, cpp_wrapper=True)
    worker.warm_up(1)  # every row count a proposal's steps can have (catch-up rows of several sequences)
    return DraftProposer(worker, StepCost.measure(worker, seqs) if measure else None)


def build_proposer(inf, tokenizer, n_slots: int, max_len: int, device: torch.device, dtype: torch.dtype):
    """The proposer ``infer.speculative`` names (None for none); rank 0 calls this."""
    if inf.speculative == "ngram":
        return NgramProposer(inf.ngram_min, inf.ngram_max)
    if inf.speculative == "draft":
        compiled = inf.draft_compile if inf.draft_compile is not None else True
        # a step whose lane decodes speculative_max_batch rows or more adds no drafts
        return load_draft_proposer(inf.draft_model_dir, tokenizer, n_slots, max_len, device, dtype, compiled,
                                   max_seqs=inf.speculative_max_batch - 1, measure=inf.speculative_policy == "cost")
    return None


def check_speculative_keys(inf) -> None:
    """Refuse a speculative setting that cannot run, in one line, before anything starts."""
    if inf.speculative not in ("none", "ngram", "draft"):
        raise UserError(f"infer.speculative={inf.speculative}: use none, ngram or draft")
    if inf.speculative == "none":
        return
    if inf.num_speculative_tokens < 1:
        raise UserError(f"infer.num_speculative_tokens={inf.num_speculative_tokens}: propose at least 1 (e.g. 4)")
    if inf.speculative_policy not in ("cost", "acceptance"):
        raise UserError(f"infer.speculative_policy={inf.speculative_policy}: use cost or acceptance")
    if inf.speculative_max_batch < 2:
        raise UserError(f"infer.speculative_max_batch={inf.speculative_max_batch}: at 1 no step would speculate; use "
                        f"at least 2 (e.g. 16), or infer.speculative=none")
    if inf.speculative == "ngram" and not 1 <= inf.ngram_min <= inf.ngram_max:
        raise UserError(f"infer.ngram_min={inf.ngram_min}, infer.ngram_max={inf.ngram_max}: use 1 <= ngram_min <= "
                        f"ngram_max")
    if inf.speculative == "draft" and not inf.draft_model_dir:
        raise UserError("infer.speculative=draft needs infer.draft_model_dir=<an export of a small model with the "
                        "target's tokenizer>")
    if inf.speculative == "draft":
        from framework.checkpoint.resolve import resolve_model_dir

        resolve_model_dir(inf.draft_model_dir)  # a missing directory fails here, in one line
