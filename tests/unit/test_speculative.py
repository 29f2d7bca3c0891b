"""Speculative decoding's pieces: the verification is an exact rejection sampler (chi-square against the target's
distribution with deliberately bad drafts; its acceptance rate is the textbook min(1, p/q) sampler's), prompt
lookup, the adaptive k, the cost policy's choice of drafts, and the scheduler's draft rows, acceptance and
cut-offs."""

import math

import pytest
import torch

from framework.infer.sampler import SamplingParams, sample
from framework.infer.scheduler import Request, Scheduler
from framework.infer.speculative import Acceptance, NgramProposer, StepCost, accepted_prefix, choose_drafts

V = 6
# a bigram "model": the target's logits for the token after token i are TABLE[i]
TABLE = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 0.3],
                      [0.1, 2.5, -0.5, 1.0, 0.0, 0.2],
                      [1.5, 0.0, 1.0, 0.2, 0.4, -2.0],
                      [0.0, 0.0, 0.0, 3.0, 0.0, 1.0],
                      [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                      [-1.0, 0.5, 2.0, 0.0, 1.0, 0.0]])


def verify(last: int, drafts, seeds: torch.Tensor, pos: int, temperature: float = 1.0) -> list[list[int]]:
    """What the engine does for one speculating row, for many seeds at once: the last stage draws every row (the
    input row and each draft row) with the request's (seed, position) noise, and the scheduler keeps the drafts
    while they equal those draws, then the draw after the last kept one. ``drafts``: one list for every seed, or a
    list per seed."""
    n = seeds.shape[0]
    per_seed = drafts if drafts and isinstance(drafts[0], list) else [drafts] * n
    rows = torch.tensor([[last] + d for d in per_seed])  # (n, 1 + k)
    drawn = []
    for j in range(rows.shape[1]):  # row j: the target's logits after the prefix ending in rows[:, j]
        drawn.append(sample(TABLE[rows[:, j]], torch.full((n,), temperature), torch.zeros(n, dtype=torch.long),
                            torch.ones(n), seeds, torch.full((n,), pos + 1 + j, dtype=torch.long)).tolist())
    out = []
    for i in range(n):
        row = [d[i] for d in drawn]
        out.append(row[: accepted_prefix(per_seed[i], row[:-1]) + 1])
    return out


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of ``counts`` against ``probs`` (cells with expected >= 5)."""
    from scipy.stats import chi2

    n = counts.sum()
    expected = probs * n
    keep = expected >= 5
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    return float(chi2.sf(stat, int(keep.sum()) - 1))


@pytest.mark.parametrize("drafts", [[4], [4, 4, 0], [1, 2]], ids=["unlikely", "unlikely-run", "likely-run"])
def test_verification_keeps_the_target_distribution(drafts):
    """With drafts the target rarely agrees with (token 4 after 0 has p ~ 0.03), the first two emitted tokens are
    distributed as the target's bigram chain: the first as softmax(TABLE[0]), the second given the first as
    softmax(TABLE[first]). 40000 seeded draws, chi-square at the 0.1% level."""
    n = 40000
    out = verify(0, drafts, torch.arange(n, dtype=torch.long) * 7919 + 13, pos=11)
    p1 = TABLE[0].softmax(-1)
    first = torch.bincount(torch.tensor([o[0] for o in out]), minlength=V).double()
    assert chi_square_p(first, p1.double()) > 1e-3
    # the pair (first, second) where a second token was emitted in the same verification (the first draft kept):
    # given the first token, the second follows the target's distribution after it
    if len(drafts) > 1:
        kept = [o for o in out if len(o) > 1]
        assert kept
        second = torch.bincount(torch.tensor([o[1] for o in kept]), minlength=V).double()
        assert chi_square_p(second, TABLE[drafts[0]].softmax(-1).double()) > 1e-3


def test_acceptance_rate_is_the_rejection_samplers():
    """A point-mass proposal x is kept with probability min(1, p(x) / q(x)) = p(x), the textbook rejection
    sampler's; the rejected rows' tokens are the normalised residual max(0, p - q), which is p without x."""
    n = 40000
    x = 4
    out = verify(0, [x], torch.arange(n, dtype=torch.long) * 104729 + 1, pos=3)
    p = TABLE[0].softmax(-1)
    accepted = sum(len(o) == 2 for o in out)
    sd = math.sqrt(n * p[x].item() * (1 - p[x].item()))
    assert abs(accepted - n * p[x].item()) < 4 * sd
    residual = p.clone()
    residual[x] = 0
    rejected = torch.bincount(torch.tensor([o[0] for o in out if len(o) == 1]), minlength=V).double()
    assert rejected[x] == 0
    assert chi_square_p(rejected, (residual / residual.sum()).double()) > 1e-3


def test_verification_is_plain_sampling_token_for_token():
    """The kept tokens are those plain sampling draws at the same (seed, positions): speculation changes no
    seeded request's text, whatever its batch."""
    seeds = torch.arange(500, dtype=torch.long)
    spec = verify(2, [0, 1, 1], seeds, pos=5)
    for i, s in enumerate(seeds.tolist()):
        last, plain = 2, []
        for j in range(len(spec[i])):
            t = sample(TABLE[last][None], torch.ones(1), torch.zeros(1, dtype=torch.long), torch.ones(1),
                       torch.tensor([s]), torch.tensor([6 + j])).item()
            plain.append(t)
            last = t
        assert spec[i] == plain


def test_greedy_verification_keeps_drafts_while_they_are_the_argmax():
    out = verify(0, [0, 0, 3], torch.zeros(1, dtype=torch.long), pos=0, temperature=0.0)
    # argmax after 0 is 0, after 0 is 0, after 0 is 0 (not 3): two kept, then the target's 0
    assert out == [[0, 0, 0]]


def test_ngram_lookup():
    prop = NgramProposer(1, 3)

    class Seq:
        def __init__(self, prompt, generated):
            self.request = Request(0, prompt, SamplingParams())
            self.generated = generated
            self.spec_state = None

    s = Seq([5, 6, 7, 8, 1, 5, 6, 7, 9], [5, 6])
    # the suffix [5, 6] (longest first, then shorter) last occurred at index 5: its continuation 7, 9, 5, ...
    assert prop.propose([s], [3]) == [[7, 9, 5]]
    s.generated += [7]  # the index is extended incrementally: [5, 6, 7] after [9]? its latest earlier occurrence
    assert prop.propose([s], [2]) == [[9, 5]]
    assert prop.propose([Seq([1, 2, 3], [4])], [4]) == [[]]  # nothing matches
    # a match close to the end reads on into the draft: a periodic run continues its period
    assert prop.propose([Seq([1, 2, 3, 1, 2], [3])], [5]) == [[1, 2, 3, 1, 2]]
    assert prop.propose([Seq([4, 7, 7], [7])], [4]) == [[7, 7, 7, 7]]
    with pytest.raises(Exception, match="ngram_min"):
        NgramProposer(3, 2)


def test_adaptive_k():
    a = Acceptance()
    assert a.next_k(4) == 4  # optimistic start
    for _ in range(10):
        a.update(0, 1)
    ks = []
    for _ in range(18):
        ks.append(a.next_k(4))
        if ks[-1]:
            a.update(0, 1)  # the probe refused too
        else:
            a.declined()
    assert ks == ([0] * 8 + [1]) * 2  # hopeless: a one-draft probe after 8 steps without a verification
    b = Acceptance()
    for _ in range(6):
        b.update(1, 3)  # one kept per rejection: ask for 2
    assert b.next_k(4) == 2
    for _ in range(6):
        b.update(4, 4)
    assert b.next_k(4) == 4


def test_acceptance_estimate_and_probes():
    a = Acceptance()
    assert a.alpha == 0.75 and a.worth(4) == (0.75, 4)  # optimistic start
    for _ in range(12):
        a.update(0, 2)  # every first draft refused: hopeless
    assert a.alpha < 0.05
    got = []
    for _ in range(8):
        got.append(a.worth(4))
        if got[-1][1] == 0:
            a.declined()
    # nothing while hopeless, then, 8 steps without a verification on, a one-draft probe weighed at PROBE_ALPHA
    assert got == [(0.0, 0)] * 8 and a.worth(4) == (Acceptance.PROBE_ALPHA, 1)
    a.update(1, 1)  # the probe was kept: measured again, no longer idle
    assert a.idle == 0
    c = Acceptance(accepted=1.0, rejected=3.0)  # 25%: not hopeless, but a policy may keep declining it
    for _ in range(Acceptance.PROBE_EVERY):
        assert c.worth(4) == (0.25, 4)
        c.declined()
    assert c.worth(4) == (0.5, 1)  # then probed, so that its estimate does not freeze
    b = Acceptance(accepted=0.0, rejected=0.0)
    for _ in range(20):
        b.update(2, 4)  # two kept, then a rejection: alpha = 2 / 3 (the MLE over drafts tried)
    assert abs(b.alpha - 2 / 3) < 1e-6


def test_step_cost_interpolates_monotone():
    c = StepCost([1, 4, 16], [6.0, 9.0, 8.0])  # a slow spike at 4 (noise only slows a step): held at 16's 8
    assert c(1) == 6.0 and c(4) == 8.0 and c(16) == 8.0 and c(10) == 8.0 and c(2) == pytest.approx(6 + 2 / 3)
    assert StepCost([1, 2], [1.0, 3.0])(4) == 7.0  # linear past the last row count


def test_cost_policy_chooses_drafts_that_pay_for_their_rows():
    free = StepCost([1, 512], [1.0, 1.0])  # rows cost nothing (a step bound by reading the weights)
    assert choose_drafts([(0.3, 4), (0.9, 2)], 2, 2, free) == [4, 2]
    compute = StepCost([1, 512], [1.0, 512.0])  # a step's time proportional to its rows
    assert choose_drafts([(0.9, 4)] * 8, 8, 8, compute) == [0] * 8  # no draft is worth a whole token
    # 6 + 0.75 r (this CPU's 30M shape, in ms): at alpha 0.5 one row verifies 2 drafts (gains .5, .25 pay for their
    # row, .125 no longer does)
    cpu = StepCost([1, 65], [6.75, 54.75])
    assert choose_drafts([(0.5, 4)], 1, 1, cpu) == [2]
    assert choose_drafts([(0.9, 4)], 1, 1, cpu) == [4]
    # at 16 rows only the likely drafts: the request accepting 90% verifies some, the one at 30% none
    assert choose_drafts([(0.9, 4), (0.3, 4)] + [(0.0, 0)] * 14, 16, 16, cpu)[:2] == [3, 0]
    # prompt tokens in the step count as rows: with 200 of them a draft row is nearly free again
    assert choose_drafts([(0.5, 4)], 201, 1, cpu) == [4]
    # a draft model's steps: each draft deep costs one; a draft step dearer than a verification row gets fewer
    assert choose_drafts([(0.5, 4)], 1, 1, cpu, StepCost([1, 64], [1.0, 1.0])) == [1]


class FixedProposer:
    def __init__(self, draft):
        self.draft, self.calls = draft, 0

    def propose(self, seqs, ks):
        self.calls += 1
        return [self.draft[:k] for k in ks]


def make_sched(proposer, k=4, max_batch=64, max_len=64, eos=()):
    return Scheduler(4, 1, 64, eos_ids=eos, max_len=max_len, proposer=proposer, num_speculative_tokens=k,
                     speculative_max_batch=max_batch)


def prefill(sched, prompts, **params):
    for i, p in enumerate(prompts):
        sched.add(Request(i, p, SamplingParams(**params)))
    plan = sched.schedule(0)
    # every prompt's first token: 9 (and, for a request with logprobs, a zero row after the tokens)
    sched.complete(plan, [9] * plan.n_sample + [0] * (sched.reply_len(plan) - plan.n_sample))
    return sched.lanes[0]


def test_scheduler_draft_rows_and_acceptance():
    sched = make_sched(FixedProposer([1, 2, 3, 4]))
    (seq,) = prefill(sched, [[5, 6, 7]], max_new_tokens=20)
    plan = sched.schedule(0)
    # the input row at position 3 (the 4th token), then 4 draft rows of the same slot at 4..7
    assert plan.dec_slots == [seq.slot] * 5 and plan.dec_pos == [3, 4, 5, 6, 7] and plan.tokens == [9, 1, 2, 3, 4]
    assert plan.dec_groups() == [(seq.slot, 0, 5)] and plan.n_sample == 5
    sched.complete(plan, [1, 2, 7, 8, 8])  # the target agrees with 1, 2, then draws 7 where the draft said 3
    assert seq.generated == [9, 1, 2, 7]
    assert (seq.spec.proposed, seq.spec.accepted, seq.spec.steps) == (4, 2, 1)
    assert sched.spec.acceptance_rate == 0.5 and sched.spec.mean_accepted_length == 3.0


def test_new_requests_start_from_the_engines_acceptance():
    sched = make_sched(FixedProposer([1, 2, 3, 4]))
    (seq,) = prefill(sched, [[5, 6, 7]], max_new_tokens=20)
    assert seq.spec.adapt.alpha == 0.75  # nothing verified yet: the optimistic start
    for _ in range(3):
        plan = sched.schedule(0)
        sched.complete(plan, [8] * plan.n_sample)  # every first draft refused
    sched.add(Request(7, [5, 6], SamplingParams(max_new_tokens=8)))
    plan = sched.schedule(0)
    new = next(s for s in sched.lanes[0] if s.request.index == 7)
    # the workload's recent acceptance, not the optimistic start: a new request of a refusing workload drafts less
    assert new.spec.adapt.alpha == sched.spec.adapt.alpha < 0.2


def test_scheduler_cuts_drafts_at_limits_and_eos():
    # max_new_tokens: 3 tokens left after the first, so at most 2 drafts (the verification emits up to 3)
    sched = make_sched(FixedProposer([1, 2, 3, 4]))
    (seq,) = prefill(sched, [[5, 6, 7]], max_new_tokens=4)
    plan = sched.schedule(0)
    assert plan.tokens == [9, 1, 2]
    sched.complete(plan, [1, 2, 3])
    assert seq.generated == [9, 1, 2, 3] and seq.finish_reason == "length"
    # the KV cache's end: positions stop at max_len - 1
    sched = make_sched(FixedProposer([1, 2, 3, 4]), max_len=6)
    prefill(sched, [[5, 6, 7]], max_new_tokens=20)
    assert sched.schedule(0).dec_pos == [3, 4, 5]
    # an accepted EOS ends the sequence there: the tokens after it are dropped
    sched = make_sched(FixedProposer([1, 0, 3]), eos=(0,))
    (seq,) = prefill(sched, [[5, 6, 7]], max_new_tokens=20)
    plan = sched.schedule(0)
    sched.complete(plan, [1, 0, 3, 4])
    assert seq.generated == [9, 1, 0] and seq.finish_reason == "stop"


def test_scheduler_cost_policy():
    # rows nearly free: every row verifies its k drafts
    prop = FixedProposer([1, 2, 3, 4])
    sched = Scheduler(4, 1, 64, max_len=64, proposer=prop, num_speculative_tokens=4,
                      step_cost=StepCost([1, 64], [1.0, 1.1]))
    prefill(sched, [[5, 6], [7, 8]], max_new_tokens=8)
    assert len(sched.schedule(0).dec_slots) == 2 * 5
    # rows as dear as tokens: no drafts, and the step counts as one without
    prop = FixedProposer([1, 2, 3, 4])
    sched = Scheduler(4, 1, 64, max_len=64, proposer=prop, num_speculative_tokens=4,
                      step_cost=StepCost([1, 64], [1.0, 64.0]))
    prefill(sched, [[5, 6], [7, 8]], max_new_tokens=8)
    assert len(sched.schedule(0).dec_slots) == 2 and prop.calls == 0 and sched.spec_skipped_steps == 1


def test_scheduler_skips_speculation_for_large_batches_and_penalties():
    prop = FixedProposer([1, 2])
    sched = make_sched(prop, max_batch=2)
    prefill(sched, [[5, 6], [7, 8]], max_new_tokens=8)
    plan = sched.schedule(0)
    assert len(plan.dec_slots) == 2 and prop.calls == 0 and sched.spec_skipped_steps == 1
    sched = make_sched(FixedProposer([1, 2]))
    prefill(sched, [[5, 6]], max_new_tokens=8, repetition_penalty=1.2)
    assert len(sched.schedule(0).dec_slots) == 1


def test_scheduler_logprobs_follow_the_kept_tokens():
    """A request with logprobs gets one row per kept token: the reply carries one per sampled row."""
    from framework.infer.sampler import token_logprobs

    sched = make_sched(FixedProposer([1, 2]))
    (seq,) = prefill(sched, [[5, 6]], max_new_tokens=8, logprobs=0)
    plan = sched.schedule(0)
    assert sched.reply_len(plan) == 3 + 3  # 3 tokens, 3 one-int rows
    rows = token_logprobs(torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7], [0.25, 0.25, 0.5]])),
                          torch.tensor([1, 0, 2]), 0)
    sched.complete(plan, [1, 0, 2] + rows.flatten().tolist())  # keeps draft 1, then the target's 0
    assert seq.generated == [9, 1, 0]
    assert [round(lp, 4) for lp, _ in seq.logprobs[1:]] == [round(math.log(0.5), 4), round(math.log(0.1), 4)]


def test_coupled_draft_keeps_the_target_distribution():
    """The draft model's proposals are drawn with the target's own (seed, position) noise from a distribution of
    its own; with a bad one (the table's rows reversed and sharpened) the emitted first token is still the target's
    softmax(TABLE[0]), and a draft equal to the target is always kept."""
    n = 40000
    seeds = torch.arange(n, dtype=torch.long) * 31 + 5
    bad = TABLE.flip(-1) * 3

    def draft_draws(table):
        return sample(table[0].expand(n, V), torch.ones(n), torch.zeros(n, dtype=torch.long), torch.ones(n), seeds,
                      torch.full((n,), 8, dtype=torch.long)).tolist()

    target_draws = draft_draws(TABLE)
    out = verify(0, [[d] for d in draft_draws(bad)], seeds, pos=7)
    firsts = [o[0] for o in out]
    counts = torch.bincount(torch.tensor(firsts), minlength=V).double()
    assert chi_square_p(counts, TABLE[0].softmax(-1).double()) > 1e-3
    assert firsts == target_draws  # token for token, the target's own draws
    kept_bad = sum(len(o) == 2 for o in out)
    same = [len(o) == 2 for o in verify(0, [[d] for d in target_draws], seeds, pos=7)]
    assert all(same) and kept_bad < n


def test_cost_policy_learns_what_steps_with_drafts_take(monkeypatch):
    """The cost policy compares each step's wall time with its prediction: when steps with drafts take 3x what the
    step cost said (and steps without, what it said), it stops drafting; once drafts cost what they are predicted
    to again, the unmeasured ratio relaxes back to 1 and drafting resumes."""
    import types

    import framework.infer.scheduler as scheduler_module

    clock = [0.0]
    monkeypatch.setattr(scheduler_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    sched = Scheduler(4, 1, 64, max_len=4096, proposer=FixedProposer([1, 2, 3, 4]), num_speculative_tokens=4,
                      step_cost=StepCost([1, 64], [1.0, 1.0 + 63 * 0.06]))
    prefill(sched, [[5, 6], [7, 8]], max_new_tokens=2000)

    def step(slowdown: float) -> bool:
        plan = sched.schedule(0)
        drafted = len(plan.dec_slots) > 2
        clock[0] += sched._timing[0][1] * (slowdown if drafted else 1.0)
        reply = []  # the target agrees with the first two drafts, then draws 7 (an acceptance of 2/3)
        for _, first, rows in plan.dec_groups():
            reply += (plan.tokens[first + 1: first + 3] + [7] * 5)[:rows]
        sched.complete(plan, reply)
        return drafted

    assert step(3.0)  # predicted: drafts pay for their rows
    drafted = [step(3.0) for _ in range(30)]
    assert not any(drafted[-10:]) and sched.cost_ratio[True] > 1.5 and sched.cost_ratio[False] == pytest.approx(1.0)
    drafted = [step(1.0) for _ in range(120)]
    assert drafted[-1] and sched.cost_ratio[True] < 2.0


def test_cost_policy_learns_what_its_drafts_keep(monkeypatch):
    """The cost policy weighs each draft at its request's acceptance estimate; when the drafts it chose keep far less
    than those estimates expected (a stale or lucky estimate), the kept / expected ratio it learns prices them out;
    steps without drafts relax the ratio back to 1, and drafts that are kept again raise it."""
    import types

    import framework.infer.scheduler as scheduler_module
    from framework.infer.speculative import Acceptance

    clock = [0.0]  # every step takes what it was predicted to take (the cost ratios stay 1)
    monkeypatch.setattr(scheduler_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(Acceptance, "alpha", property(lambda self: 0.9))  # an estimate that never moves
    monkeypatch.setattr(Acceptance, "worth", lambda self, k_max: (0.9, k_max))
    sched = Scheduler(4, 1, 64, max_len=4096, proposer=FixedProposer([1, 2, 3, 4]), num_speculative_tokens=4,
                      step_cost=StepCost([1, 64], [1.0, 1.0 + 63 * 0.5]))  # a row costs half a step
    prefill(sched, [[5, 6], [7, 8]], max_new_tokens=2000)

    def step(agree: bool) -> bool:
        plan = sched.schedule(0)
        clock[0] += sched._timing[0][1]
        reply = []
        for _, first, rows in plan.dec_groups():  # the target keeps every draft, or none
            reply += (plan.tokens[first + 1: first + rows] if agree else [7] * (rows - 1)) + [7]
        sched.complete(plan, reply)
        return len(plan.dec_slots) > 2

    assert step(False)  # at 0.9 a draft pays for its row
    drafted = [step(False) for _ in range(30)]
    assert not any(drafted[-10:]) and sched.keep_ratio < 0.75
    drafted = [step(True) for _ in range(200)]
    assert any(drafted[:150]) and drafted[-1] and sched.keep_ratio > 0.9


def test_prompt_lookup_is_made_before_the_cost_policy_weighs_it():
    """Prompt lookup costs nothing next to a step, so the scheduler looks drafts up first: a sequence whose lookup
    finds nothing is no candidate, and the cost it predicts for the step counts only the draft rows there are."""
    cost = StepCost([1, 64], [1.0, 1.1])  # rows nearly free: every draft found is verified
    sched = Scheduler(4, 1, 64, max_len=256, proposer=NgramProposer(1, 2), num_speculative_tokens=4, step_cost=cost)
    # the first prompt repeats (its last token 9, after prefill, was seen before: 1 2 9 3 ... -> drafts 3 4), the
    # second has no earlier 9
    prefill(sched, [[1, 2, 9, 3, 4], [5, 6, 7, 8]], max_new_tokens=8)
    plan = sched.schedule(0)
    groups = {slot: rows for slot, _, rows in plan.dec_groups()}
    assert sorted(groups.values()) == [1, 5]
    assert sched._timing[0][:2] == (True, pytest.approx(cost(2 + 4)))


def test_draft_proposer_keeps_declined_sequences_in_step(tmp_path):
    """A draft model's proposal also feeds the sequences the policy gave no drafts (k = 0) that are only a few
    tokens behind the draft cache (decode rows of a step that runs anyway), and leaves out those that would need a
    prompt segment; a sequence's drafts do not depend on who else is fed beside it (the draft's own greedy text)."""
    from framework.data.tokenizer import load_tokenizer
    from framework.infer.speculative import load_draft_proposer
    from tests.helpers import make_hf_model

    make_hf_model(str(tmp_path), n_layers=1)
    tok = load_tokenizer(str(tmp_path))
    prop = load_draft_proposer(str(tmp_path), tok, 4, 64, torch.device("cpu"), torch.float32, compiled=False)

    class Seq:
        def __init__(self, slot, prompt, generated):
            self.request = Request(slot, prompt, SamplingParams())
            self.slot, self.generated, self.spec_state = slot, generated, None

    a, b, c = Seq(0, [3, 4, 5, 6], [7]), Seq(1, [8, 9, 10, 11], [12]), Seq(2, [13, 14, 15], [16])
    assert prop.propose([a, b], [3, 3]) == [prop.propose([Seq(3, [3, 4, 5, 6], [7])], [3])[0], prop.propose(
        [Seq(3, [8, 9, 10, 11], [12])], [3])[0]]
    a.generated += [20, 21]
    b.generated += [22, 23, 24]
    got = prop.propose([a, b, c], [2, 0, 0])
    assert [len(d) for d in got] == [2, 0, 0]
    assert b.spec_state == b.request.prompt_ids + b.generated  # caught up beside a, no drafts of its own
    assert c.spec_state is None  # never fed: a whole prompt is left for when it drafts
    alone = Seq(3, a.request.prompt_ids, [7])  # the same history, alone: a prompt chunk, then decode rows
    prop.propose([alone], [3])
    alone.generated += [20, 21]
    assert got[0] == prop.propose([alone], [2])[0]
    assert prop.propose([a, b], [0, 0]) == [[], []]  # nothing to draft: no step
