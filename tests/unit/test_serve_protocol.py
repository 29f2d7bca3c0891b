"""The server's pure parts: OpenAI request checks and incremental detokenization (no process, no model)."""

from __future__ import annotations

import pytest

from framework.infer.detok import IncrementalText
from framework.infer.server.protocol import APIError, Defaults, decode_body, json_depth, parse_request, render_chat


@pytest.fixture(scope="module")
def tok():
    from framework.data.tokenizer import train_bpe

    return train_bpe(["hello world, the quick brown fox", "héllo wörld 你好 🙂 ok", "a STOP b"] * 20, 300)


def stream(tok, text: str, stop=(), final: str | None = None) -> tuple[list[str], str]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    inc = IncrementalText(tok, tuple(stop))
    parts = [inc.push(t) for t in ids[:-1]]
    parts.append(inc.finish(final if final is not None else tok.decode(ids, skip_special_tokens=True)))
    return parts, "".join(parts)


def test_incremental_text_equals_the_full_decode(tok):
    text = "héllo wörld 你好 🙂 the fox"
    parts, joined = stream(tok, text)
    assert joined == text
    assert not any("\ufffd" in p for p in parts)  # a character split over byte tokens waits for its last byte
    assert sum(bool(p) for p in parts) > 5  # and it does stream


def test_text_that_may_start_a_stop_string_is_held_back(tok):
    text = "a STOP b"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    inc = IncrementalText(tok, ("STOP",))
    sent = ""
    for i, t in enumerate(ids):
        if "STOP" in tok.decode(ids[: i + 1]):  # the engine ends the sequence at this token
            break
        sent += inc.push(t)
        assert "S" not in sent  # never a piece of the stop string
    assert sent + inc.finish("a ") == "a "  # the engine cut the text at the stop string


def test_neutral_values_of_unsupported_fields_are_accepted():
    r = parse_request({"prompt": "x", "logprobs": None, "echo": False, "n": 1, "presence_penalty": 0,
                       "frequency_penalty": 0.0, "best_of": 1, "user": "u"}, chat=False, max_n=8)
    assert r.prompts == ["x"] and r.n == 1 and r.temperature == 0.0  # Defaults(): greedy


@pytest.mark.parametrize("body,words", [
    ({"prompt": "x", "logprobs": 21}, "'logprobs'=21 is out of range: must be <= 20"),
    ({"prompt": "x", "logprobs": True}, "'logprobs' must be an integer, got a boolean"),
    ({"prompt": "x", "presence_penalty": 0.5}, "'presence_penalty' is not supported"),
    ({"prompt": "x", "bogus": 1}, "unknown field 'bogus'"),
    ({"prompt": "x", "max_tokens": True}, "'max_tokens' must be an integer, got a boolean"),
    ({"prompt": "x", "max_tokens": 0}, "'max_tokens'=0"),
    ({"prompt": "x", "top_p": 0}, "'top_p'=0.0 is out of range: must be > 0.0"),
    ({"prompt": "x", "temperature": 3}, "must be <= 2.0"),
    ({"prompt": "x", "n": 9}, "'n'=9"),
    ({"prompt": "x", "stop": [1]}, "'stop' must be"),
    ({"prompt": "x", "stop": [""]}, "non-empty"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "only allowed with 'stream': true"),
    ({"prompt": []}, "'prompt' is empty"),
    ({"prompt": [1, "a"]}, "'prompt' must be"),
    ({}, "'prompt' is required"),
    ([1], "must be a JSON object"),
])
def test_bad_completion_requests_name_the_field(body, words):
    with pytest.raises(APIError) as e:
        parse_request(body, chat=False, max_n=8)
    assert e.value.status == 400 and words in e.value.message


def test_chat_requests():
    r = parse_request({"messages": [{"role": "developer", "content": [{"type": "text", "text": "be "},
                                                                       {"type": "text", "text": "brief"}]},
                                    {"role": "user", "content": "hi"}], "max_completion_tokens": 5, "seed": 3,
                       "n": 2, "temperature": 0.7},
                      chat=True, max_n=8, defaults=Defaults(top_k=40, stop=("END",)))
    assert r.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert (r.max_tokens, r.top_k, r.stop, r.seeds()) == (5, 40, ("END",), [3, 4])
    with pytest.raises(APIError, match="'messages\\[0\\].role'"):
        parse_request({"messages": [{"role": "tool", "content": "x"}]}, chat=True, max_n=8)
    with pytest.raises(APIError, match="not both"):
        parse_request({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
                       "max_completion_tokens": 2}, chat=True, max_n=8)


def test_default_chat_template_ends_turns_with_eos(tok):
    text = render_chat(tok, [{"role": "user", "content": "hi"}], None)
    assert text == "<|user|>\nhi<|endoftext|>\n<|assistant|>\n"


@pytest.mark.parametrize("raw,words", [
    (b'{"prompt": "x", "temperature": NaN}', "NaN is not a JSON number"),
    (b'{"prompt": "x", "top_p": Infinity}', "Infinity is not a JSON number"),
    (b'{"prompt": "x", "top_p": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"prompt": "x", "top_p": 1e999}', "too large for a float"),
    (b"[" * 100_000 + b"]" * 100_000, "nests 100000 levels deep"),
    (b'{"a": ' * 50 + b"1" + b"}" * 50, "nests 50 levels deep"),
    (b'{"prompt": "\xff\xfe"}', "not UTF-8"),
    (b'{"prompt": 1' + b"0" * 5000 + b"}", "Exceeds the limit"),
    (b"", "malformed JSON"),
])
def test_bodies_that_are_not_strict_json_are_refused_at_decode(raw, words):
    with pytest.raises(APIError) as e:
        decode_body(raw)
    assert e.value.status == 400 and words in e.value.message


def test_brackets_inside_strings_do_not_count_as_nesting():
    assert json_depth(b'{"prompt": "[[[[[[[[[[[[[[[[[[[[[[[\\"{{{{{{{{{{{{{{{{{{{", "stop": ["]"]}') == 2
    assert decode_body(b'{"prompt": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}') == {"prompt": "[" * 34}


@pytest.mark.parametrize("body,words", [
    ({"prompt": "x", "top_k": 18446744073709551617}, "'top_k'=18446744073709551617 is out of range: must be <= "),
    ({"prompt": "x", "temperature": float("nan")}, "'temperature' must be a finite number"),
    ({"prompt": "x", "seed": 2**63}, "'seed'="),
    ({"prompt": "x", "max_tokens": "9"}, "'max_tokens' must be an integer, got a string"),
    ({"prompt": "x", "repetition_penalty": 1e300}, "must be <= 100.0"),
    ({"prompt": "x", "stop": ["s"] * 17}, "at most 16 non-empty strings"),
    ({"prompt": "x", "stop": "s" * 129}, "of at most 128 characters"),
    ({"prompt": "\ud800"}, "'prompt' holds an unpaired UTF-16 surrogate"),
    ({"prompt": "x", "stop": ["\udfff"]}, "'stop' holds an unpaired"),
    ({"prompt": [[1], []]}, "'prompt' must be"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}},
     "'stream_options.include_usage' must be a boolean, got an integer"),
    ({"prompt": "x", "best_of": 2}, "'best_of' is not supported by this server (got 2)"),
])
def test_numbers_strings_and_sizes_are_bounded(body, words):
    with pytest.raises(APIError) as e:
        parse_request(body, chat=False, max_n=8)
    assert e.value.status == 400 and words in e.value.message, e.value.message
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_top_k_is_clamped_to_the_vocabulary_and_tiny_temperatures_are_greedy():
    r = parse_request({"prompt": "x", "top_k": 5000, "temperature": 1e-300}, chat=False, max_n=8, vocab=300)
    assert (r.top_k, r.temperature) == (0, 0.0)  # k >= vocab keeps every token
    assert parse_request({"prompt": "x", "top_k": 299}, chat=False, max_n=8, vocab=300).top_k == 299


def test_a_message_with_a_surrogate_is_a_4xx_that_can_be_written():
    with pytest.raises(APIError) as e:
        parse_request({"prompt": "x", "\ud800": 1}, chat=False, max_n=8)
    import json

    json.dumps(e.value.body(), ensure_ascii=False).encode("utf-8")  # no lone surrogate left in the message


def test_an_unknown_field_is_named_before_a_missing_one():
    with pytest.raises(APIError, match="unknown field 'messages'"):
        parse_request({"messages": [{"role": "user", "content": "x"}]}, chat=False, max_n=8)
