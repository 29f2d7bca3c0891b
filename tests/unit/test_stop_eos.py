"""How generation stops: the EOS set, stop strings that cut token ids, text and usage alike, and incremental
detokenization (DecodeStream and the window fallback) against the full decode."""

from __future__ import annotations

import json

import pytest

from framework.infer.detok import StopScanner, TextStream
from framework.infer.sampler import SamplingParams
from framework.infer.scheduler import Request, Scheduler
from framework.infer.startup import read_eos_ids

TEXTS = ["hello world, the quick brown fox", "héllo wörld 你好 🙂 ok", "a STOP b", "naïve café 日本語 テキスト 👍🏽"]


@pytest.fixture(scope="module")
def tok():
    from framework.data.tokenizer import train_bpe

    return train_bpe(TEXTS * 20, 300)


class SlowTokenizer:
    """A tokenizer without ``tokenizers``' backend: TextStream falls back to its window method."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def run(sched: Scheduler, tokens_for: dict[int, list[int]]) -> dict:
    """Drive the scheduler as the engine would, feeding each request its scripted tokens; the finished rows."""
    done, fed = {}, {i: 0 for i in tokens_for}
    sched.on_finish = lambda seq: done.setdefault(seq.request.index, seq)
    while sched.has_work():
        plan = sched.schedule(sched.next_lane())
        rows = {s.slot: s.request.index for s in sched.lanes[plan.lane]}
        slots, _ = plan.sample_slots_positions()
        out = []
        for slot in slots:
            i = rows[slot]
            out.append(tokens_for[i][fed[i]])
            fed[i] += 1
        sched.complete(plan, out)
    return done


def test_any_id_of_the_eos_set_stops(tok):
    sched = Scheduler(n_slots=4, n_lanes=1, prefill_chunk=64, eos_ids={7, 9})
    for i in range(3):
        sched.add(Request(i, [1, 2, 3], SamplingParams(max_new_tokens=6, ignore_eos=i == 2)))
    done = run(sched, {0: [5, 9, 5, 5, 5, 5], 1: [5, 5, 7, 5, 5, 5], 2: [9, 7, 9, 7, 9, 7]})
    assert (done[0].generated, done[0].finish_reason) == ([5, 9], "stop")
    assert (done[1].generated, done[1].finish_reason) == ([5, 5, 7], "stop")
    assert (done[2].generated, done[2].finish_reason) == ([9, 7, 9, 7, 9, 7], "length")  # ignore_eos


def test_the_eos_set_reads_generation_config_lists_and_the_tokenizer(tok, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 128008}))
    assert read_eos_ids(str(tmp_path), tok) == {128001, 128008, 128009, tok.eos_token_id}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    (tmp_path / "config.json").unlink()
    assert read_eos_ids(str(tmp_path), tok) == {5, tok.eos_token_id}


@pytest.mark.parametrize("slow", [False, True])
def test_a_stop_string_cuts_token_ids_text_and_usage_alike(tok, slow):
    text = "héllo wörld 你好 🙂 ok a STOP b the quick brown fox"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stops = ("STOP", "never")
    sched = Scheduler(n_slots=2, n_lanes=1, prefill_chunk=64, tokenizer=SlowTokenizer(tok) if slow else tok)
    sched.add(Request(0, [1, 2], SamplingParams(max_new_tokens=len(ids), stop=stops)))
    sched.add(Request(1, [1, 2], SamplingParams(max_new_tokens=len(ids), stop=("🙂",))))
    seq = run(sched, {0: ids, 1: ids})
    for s, stop in ((seq[0], "STOP"), (seq[1], "🙂")):
        cut = text[: text.index(stop)]
        assert s.finish_reason == "stop" and s.text == cut
        kept = tok.decode(s.generated, skip_special_tokens=True)
        # the kept tokens are exactly those whose text ends before the stop string
        assert cut.startswith(kept) and len(s.generated) < len(ids)
        assert len(tok.decode(ids[: len(s.generated) + 1], skip_special_tokens=True)) > len(cut)  # the next reaches it
        assert s.generated == ids[: len(s.generated)]


def test_a_stop_string_in_the_first_token_leaves_no_tokens(tok):
    ids = tok("STOP b", add_special_tokens=False)["input_ids"]
    scan = StopScanner(tok, ("STOP",))
    hit = [scan.push(t) for t in ids]
    assert any(hit) and scan.cut == (0, "")


def test_stop_search_is_incremental(tok):
    """Each token's text is decoded once: the scanner's work does not grow with the length of the output."""
    calls = []

    class Counting(SlowTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    ids = tok(" the quick brown fox" * 40, add_special_tokens=False)["input_ids"]
    scan = StopScanner(Counting(tok), ("never there",))
    assert not any(scan.push(t) for t in ids)
    assert scan.text == tok.decode(ids) and max(calls) <= 8  # a short window, never the whole output


@pytest.mark.parametrize("text", TEXTS + ["日本語🙂🙂👍🏽 x", " leading space and  double"])
def test_decode_stream_equals_the_full_decode(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    fast, slow = TextStream(tok), TextStream(SlowTokenizer(tok))
    assert fast._stream is not None and slow._stream is None
    pieces = [fast.push(t) for t in ids]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(slow.push(t) for t in ids) == text


def test_an_id_beyond_the_tokenizer_has_no_text(tok):
    stream = TextStream(tok)
    assert stream.push(len(tok) + 50) == ""
    assert stream.push(tok("ok", add_special_tokens=False)["input_ids"][0]) != "\ufffd"
