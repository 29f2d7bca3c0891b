"""Single-process pieces: topology checks, the loader, the stage plan, sampling against transformers."""

import pytest
import torch

from framework.cli import UserError, explain_compose_error, strip_launcher_args
from framework.data.loader import ShardedLoader
from framework.data.synthetic import make_examples
from framework.parallel.topology import build_topology
from framework.weights.layout import split_layers


def test_topology_layout_and_errors():
    t = build_topology(8, rank=5, tp=2, n_heads=8, n_kv_heads=4)
    assert (t.dp, t.tp_rank, t.dp_rank) == (4, 1, 2)
    with pytest.raises(UserError, match="does not divide the 4 key-value heads"):
        build_topology(3, 0, tp=3, n_heads=12, n_kv_heads=4)
    with pytest.raises(UserError, match="not divisible by tp"):
        build_topology(3, 0, tp=2, n_heads=4, n_kv_heads=2)


def test_loader_shards_by_dp_rank_and_resumes():
    blocks = torch.arange(100).view(50, 2)
    single = ShardedLoader(blocks, 8, 1, 0, seed=1)
    shards = [ShardedLoader(blocks, 8, 2, r, seed=1) for r in range(2)]
    for _ in range(10):  # crosses an epoch boundary
        full = single.next_batch()
        assert torch.equal(torch.cat([s.next_batch() for s in shards]), full)
    state = single.state_dict()
    nxt = single.next_batch()
    again = ShardedLoader(blocks, 8, 1, 0, seed=1)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch(), nxt)


def test_synthetic_answers_are_right():
    for ex in make_examples("sort", 5, 0, 3, 5):
        digits = ex.prompt.split(":")[1].split("=")[0].split()
        assert ex.answer.split() == sorted(digits)
    for ex in make_examples("add", 5, 0, 2, 4):
        a, b = ex.prompt.split(":")[1].split("=")[0].split("+")
        assert int(ex.answer.replace(" ", "")) == int(a.replace(" ", "")) + int(b.replace(" ", ""))


def test_split_layers():
    assert split_layers(5, 3, None) == [[0, 1], [2, 3], [4]]
    assert split_layers(16, 4, [3, 5, 5, 3])[1] == [3, 4, 5, 6, 7]
    with pytest.raises(UserError, match="more than the model's 5 layers"):
        split_layers(5, 6, None)
    with pytest.raises(UserError, match="adding up"):
        split_layers(5, 2, [2, 2])


def test_batched_sampling_filters_match_transformers_row_by_row():
    """Each row of one batched call, with its own penalty, top-k and top-p, equals transformers' processors."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from framework.infer.sampler import apply_repetition_penalty, filter_top_k_top_p

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    ids = torch.tensor([[3, 7, 7, 20], [1, 2, 3, 4], [9, 9, 9, 9]])
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, ids, True)
    pen = torch.tensor([1.3, 1.0, 0.7])
    got = apply_repetition_penalty(logits, seen, pen)
    for i in range(3):
        want = RepetitionPenaltyLogitsProcessor(float(pen[i]))(ids[i: i + 1], logits[i: i + 1].clone())[0]
        torch.testing.assert_close(got[i], want)
    top_k, top_p = torch.tensor([5, 0, 50]), torch.tensor([1.0, 0.8, 0.5])
    got = filter_top_k_top_p(logits, top_k, top_p)
    for i in range(3):
        want = logits[i: i + 1].clone()
        if 0 < top_k[i] < 50:
            want = TopKLogitsWarper(int(top_k[i]))(ids[i: i + 1], want)
        if top_p[i] < 1:
            want = TopPLogitsWarper(float(top_p[i]))(ids[i: i + 1], want)
        torch.testing.assert_close(got[i], want[0])


def test_seeded_draws_follow_the_distribution_and_ignore_the_batch():
    """The Gumbel-max draw from the hash noise samples softmax(logits / T); a row's draw does not depend on the
    rows beside it; greedy rows take the argmax."""
    from framework.infer.sampler import sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    n = 20000
    draws = sample(logits.expand(n, 4), torch.ones(n), torch.zeros(n, dtype=torch.long), torch.ones(n),
                   torch.arange(n), torch.full((n,), 7))
    freq = torch.bincount(draws, minlength=4).float() / n
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)
    mixed = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    temp = torch.tensor([0.0, 1.0, 0.7, 1.0, 0.0])
    args = (torch.tensor([0, 5, 0, 0, 0]), torch.tensor([1.0, 1.0, 0.9, 1.0, 1.0]), torch.arange(5), torch.arange(5) + 3)
    batch = sample(mixed, temp, *args)
    for i in range(5):
        alone = sample(mixed[i: i + 1], temp[i: i + 1], *(a[i: i + 1] for a in args))
        assert alone.item() == batch[i].item()
    assert batch[0] == mixed[0].argmax() and batch[4] == mixed[4].argmax()


def test_launcher_args_and_error_lines():
    assert strip_launcher_args(["--local_rank=3", "a=1"]) == ["a=1"]
    assert strip_launcher_args(["--local-rank", "2", "b=2"]) == ["b=2"]

    class Exc(Exception):
        pass

    msg = explain_compose_error(
        Exc("Could not override 'trainer.lrr'. Key 'lrr' not in 'TrainerConfig' full_key: trainer.lrr"), None)
    assert msg.startswith("unknown config key 'trainer.lrr'")


def test_relaid_linears_match_f_linear_and_leave_tied_weights():
    from framework.infer.cpu_linear import PackedLinear, StreamLinear, TransposedLinear, pack_linears, packing_available
    from framework.infer.worker import StageWeights, forward_logits
    from framework.kernels import cpu_quant
    from framework.models.llama import Llama, ModelArgs

    if not packing_available(torch.float32, torch.device("cpu")):
        pytest.skip("this torch has no oneDNN packed linear kernels")
    torch.manual_seed(0)
    args = ModelArgs(dim=512, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=1536, vocab_size=97, tie_embeddings=True)
    ref = Llama(args).eval()
    tokens = torch.randint(0, 97, (3, 11))
    with torch.inference_mode():
        want = ref(tokens=tokens)
    stream = StreamLinear if cpu_quant.available() else None
    for rows, kind in ((16, PackedLinear), (4, stream or PackedLinear), (1, stream or TransposedLinear)):
        model = Llama(args).eval()
        model.load_state_dict(ref.state_dict())
        model.tie_weights()
        weights = StageWeights(model).eval()  # q|k|v and gate|up as one matrix each, as the inference loader does
        torch.testing.assert_close(forward_logits(weights, tokens), want, rtol=1e-5, atol=1e-5)
        # every layer's four matrices take the faster layout; the LM head shares the embedding and stays
        assert pack_linears(weights, rows_hint=rows) == 4 * args.n_layers
        assert type(weights.layers[0].qkv) is kind
        assert weights.lm_head.weight is weights.embed.weight
        got = forward_logits(weights, tokens)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    small = StageWeights(Llama(ModelArgs(dim=128, n_layers=1, n_heads=4, ffn_dim=384, vocab_size=97)).eval())
    assert pack_linears(small, rows_hint=16) == 0  # the packed kernel's cost a call would outweigh its gain


def test_stream_linear_matches_f_linear_and_gives_a_row_the_same_bits_in_any_batch():
    """The few-row layout: the kernel up to KERNEL_ROWS rows (a row's bits independent of the rows beside it, so a
    verification row of speculative decoding computes what the plain step computes), F.linear above."""
    from framework.infer.cpu_linear import StreamLinear
    from framework.kernels import cpu_quant

    if not cpu_quant.available():
        pytest.skip("the CPU decode kernels did not build here (no C++ compiler)")
    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 37)  # 100 features: a K % 16 tail; a bias
    mod = StreamLinear(lin)
    for rows in (1, 2, 5, 6, 7, 8, 9, 40):
        x = torch.randn(rows, 100)
        y = mod(x)
        torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        if rows <= StreamLinear.KERNEL_ROWS:
            assert all(torch.equal(mod(x[i: i + 1]), y[i: i + 1]) for i in range(rows))
    x3 = torch.randn(2, 3, 100)  # leading dimensions kept
    torch.testing.assert_close(mod(x3), torch.nn.functional.linear(x3, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_few_row_layouts_without_the_kernels_are_f_linear(monkeypatch):
    """Built without the kernels (no C++ compiler, ``MIAOTUI_QUANT_KERNELS=0``): every call of the few-row layouts
    is F.linear and none reaches the kernel, an empty one too (a compiled engine's head over a prompt chunk that
    samples no row)."""
    from framework.infer.cpu_linear import RowDotLinear, StreamLinear
    from framework.kernels import cpu_quant

    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 10)
    with cpu_quant.disabled():
        mods = [StreamLinear(lin), RowDotLinear(lin)]

    def no_kernel(*_):
        raise AssertionError("the kernel was called without the kernels")

    monkeypatch.setattr(cpu_quant, "f32_gemv", no_kernel)
    for mod in mods:
        assert mod.gemv_rows == 0
        for rows in (0, 1, 3):
            x = torch.randn(rows, 24)
            torch.testing.assert_close(mod(x), torch.nn.functional.linear(x, lin.weight, lin.bias))


def test_row_dot_linear_compiled_matches_f_linear():
    """The one-row layout for a compiled decode step computes F.linear, inside and outside the graph."""
    from framework.infer.cpu_linear import RowDotLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    row = RowDotLinear(lin)
    x = torch.randn(1, 64)
    want = torch.nn.functional.linear(x, lin.weight, lin.bias)
    with torch.inference_mode():
        torch.testing.assert_close(torch.compile(row)(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(row(torch.randn(5, 64)).shape, torch.Size([5, 48]))
        torch.testing.assert_close(row(x), want)


def test_folded_norm_weights_give_the_same_logits():
    """A batch-1 compiled CPU step runs with each layer's norm weights folded into q|k|v and gate|up."""
    from framework.infer.worker import StageWeights, forward_logits
    from framework.models.llama import Llama, ModelArgs

    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=97)
    model = Llama(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # not the ones they start as
    weights = StageWeights(model).eval()
    tokens = torch.randint(0, 97, (2, 9))
    want = forward_logits(weights, tokens)
    assert weights.fold_norms() == 2 * args.n_layers
    assert weights.layers[0].input_norm.weight is None and weights.norm.weight is not None
    got = forward_logits(weights, tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_lanes_share_the_prefill_budget_and_a_long_prompt_is_chunked():
    from framework.infer.sampler import SamplingParams
    from framework.infer.scheduler import Request, Scheduler

    sched = Scheduler(n_slots=8, n_lanes=2, prefill_chunk=64)
    sched.add(Request(0, list(range(100)), SamplingParams(max_new_tokens=2)))  # a long prompt
    for i in range(1, 7):
        sched.add(Request(i, [1, 2, 3, 4, 5], SamplingParams(max_new_tokens=2)))
    steps = []
    while sched.has_work():
        lane = sched.next_lane()
        plan = sched.schedule(lane)
        steps.append(plan)
        prompt_tokens = sum(length for _, _, length in plan.segs)
        assert prompt_tokens <= 32, "each of two lanes prefills at most half of prefill_chunk a step"
        assert plan.n_tokens == len(plan.dec_slots) + prompt_tokens
        sched.complete(plan, [7] * plan.n_sample)
    first = steps[0].segs[0][0]  # the long prompt's slot: admitted first
    chunks = [(start, length) for p in steps for slot, start, length in p.segs if p.lane == 0 and slot == first]
    assert [s for s, _ in chunks] == [0, 32, 64, 96] and sum(n for _, n in chunks) == 100
    assert {p.lane for p in steps} == {0, 1} and sched.running == 0 and not sched.waiting


def test_decode_attention_reads_each_slots_cache_once():
    """A step's rows as runs of one slot (a slot's row and its draft rows) attend through one read of the slot's
    cache: views for consecutive slots, one gathered copy a slot otherwise, runs of unequal length padded to the
    longest; the same result as the gathered copy a row (the compiled step's path)."""
    from framework.infer.worker import decode_attention, slot_runs

    r = slot_runs([3, 4, 5])
    assert (r.u, r.r, r.first, r.slots, r.pad_index) == (3, 1, 3, None, None)
    r = slot_runs([2, 2, 2, 2, 2])
    assert (r.u, r.r, r.first, r.pad_index) == (1, 5, 2, None)
    r = slot_runs([0, 0, 2, 2, 2, 5])
    assert (r.u, r.r, r.first, r.slots.tolist(), r.pad_index.tolist()) == (3, 3, None, [0, 2, 5], [0, 1, 3, 4, 5, 6])
    torch.manual_seed(0)
    kc, vc = torch.randn(6, 2, 32, 8), torch.randn(6, 2, 32, 8)  # (slots, kv heads, positions, head dim)
    for slots, positions in (([1, 1, 1, 2, 2, 2], [5, 6, 7, 9, 10, 11]), ([0, 1, 2], [3, 20, 7]), ([2] * 5, [4, 5, 6, 7, 8]),
                             ([0, 2, 4], [3, 9, 1]), ([1, 2, 2, 3, 3, 3], [4, 8, 9, 20, 21, 22]),
                             ([5, 5, 0, 3, 3, 3], [2, 3, 11, 6, 7, 8])):
        q = torch.randn(len(slots), 4, 8)
        window = max(positions) + 1
        s, p = torch.tensor(slots), torch.tensor(positions)
        want = decode_attention(q, kc, vc, s, p, window, True)
        got = decode_attention(q, kc, vc, s, p, window, True, slot_runs(slots))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        one = decode_attention(q[:1], kc, vc, s[:1], p[:1], positions[0] + 1, False)  # a row's own context, unmasked
        torch.testing.assert_close(want[:1], one, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["plain", "one-row"])
def test_compiled_cpu_step_is_built_at_load_for_every_row_count(layout):
    """A compiled CPU decode step that may carry draft rows (max_rows > the batch) is compiled at load for the row
    counts verification brings, not while serving: a step of any row count after ``warm_up`` compiles nothing,
    and gives the eager step's logits. ``one-row``: the weights laid out as a draft's (``lay_out_for_decode`` for
    one compiled row: norms folded, cpu_linear.relaid), whose kernel rows (cut to 3 here) end inside max_rows: the
    GEMM's graph past them is built too."""
    import copy

    from torch._dynamo.utils import counters

    from framework.infer.cache import KVCache
    from framework.infer.cpu_linear import packing_available
    from framework.infer.loader import lay_out_for_decode
    from framework.infer.step import StepPlan
    from framework.infer.worker import StageWeights, StageWorker, path_rows
    from framework.kernels import cpu_quant
    from framework.models.llama import Llama, ModelArgs

    if layout == "one-row" and not (cpu_quant.available() and packing_available(torch.float32, torch.device("cpu"))):
        pytest.skip("no C++ compiler for framework/kernels, or a torch without oneDNN")
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=97)
    weights = StageWeights(Llama(args).eval()).eval()
    laid = weights
    if layout == "one-row":
        laid = lay_out_for_decode(copy.deepcopy(weights), None, 128, 1, torch.float32, torch.device("cpu"), compiled=True)
        for m in laid.modules():
            if getattr(m, "gemv_rows", 0):
                m.gemv_rows = 3
        assert path_rows(laid) == [3]

    def worker(compiled: bool) -> StageWorker:
        cache = KVCache([0, 1], 2, 2, 64, 16, torch.float32, torch.device("cpu"))
        return StageWorker(laid if compiled else weights, cache, torch.device("cpu"), torch.float32,
                           compile_decode=compiled, max_rows=6)

    eager, compiled = worker(False), worker(True)
    compiled.warm_up(1)
    graphs = counters["stats"]["unique_graphs"]
    for w in (eager, compiled):  # a prompt of 12 tokens in slot 0
        w.step(StepPlan(segs=[(0, 0, 12)], seg_sample=[1], seg_next=[-2], tokens=list(range(1, 13))), None)
    for rows in (1, 3, 5, 2, 6):
        plan = StepPlan(dec_slots=[0] * rows, dec_pos=list(range(12, 12 + rows)), tokens=list(range(20, 20 + rows)))
        torch.testing.assert_close(compiled.step(plan, None), eager.step(plan, None), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs
