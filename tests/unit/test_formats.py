"""Fine-tuning formats (framework/data/formats.py) and the offline task data (framework/data/tasks.py)."""

import filecmp
import json
import os

import pytest

from framework.cli import UserError
from framework.data.formats import DEFAULT_CHAT_TEMPLATE, detect_format, encode_example
from framework.data.tasks import TASK_NAMES, make_task_rows, write_task_splits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tok():
    from framework.data.tokenizer import train_bpe

    texts = [r["prompt"] + r["completion"] for t in TASK_NAMES for r in make_task_rows(t, 200, 0)]
    return train_bpe(texts + ["<|user|> <|assistant|> <|system|> hello there, be brief"], 400)


def test_detect_format():
    assert detect_format({"text": "x"}) == "text"
    assert detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"instruction": "a", "input": "", "output": "b"}) == "alpaca"
    with pytest.raises(UserError, match="data.format="):
        detect_format({"question": "?"})


def test_prompt_completion_masks_the_prompt(tok):
    row = {"prompt": "Review: the soup was cold.\nSentiment:", "completion": " negative"}
    ids, mask = encode_example(row, "auto", tok, train_on_prompt=False)
    n_prompt = len(tok(row["prompt"], add_special_tokens=False)["input_ids"])
    assert mask[:n_prompt] == [0] * n_prompt and set(mask[n_prompt:]) == {1}
    assert ids[-1] == tok.eos_token_id  # the end of the answer is learnt
    assert tok.decode(ids[n_prompt:], skip_special_tokens=True) == " negative"
    _, all_mask = encode_example(row, "prompt_completion", tok, train_on_prompt=True)
    assert set(all_mask) == {1}


def test_messages_match_transformers_chat_template(tok):
    tok.chat_template = None
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the soup was cold"},
                        {"role": "assistant", "content": "negative"}, {"role": "user", "content": "hello there"},
                        {"role": "assistant", "content": "positive"}]}
    ids, mask = encode_example(row, "messages", tok, train_on_prompt=False)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE  # a tokenizer without one gets the project's
    assert tok.apply_chat_template(row["messages"], tokenize=True)["input_ids"] == ids
    trained = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True)
    assert trained == "negative\npositive\n"  # the assistant turns only, each through its end of turn
    with pytest.raises(UserError, match="no assistant turn"):
        encode_example({"messages": [{"role": "user", "content": "hi"}]}, "messages", tok, False)


def test_alpaca(tok):
    ids, mask = encode_example({"instruction": "say hi", "input": "", "output": "hello"}, "auto", tok, False)
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True) == "hello"
    assert "### Response:" in tok.decode(ids)


def test_task_data_is_shipped_and_reproducible(tmp_path):
    shipped = os.path.join(ROOT, "configs", "lm_eval", "data")
    for path in write_task_splits(str(tmp_path)):
        assert filecmp.cmp(path, os.path.join(shipped, os.path.basename(path)), shallow=False), path
    for task in TASK_NAMES:
        rows = [json.loads(x) for x in open(os.path.join(shipped, f"{task}_train.jsonl"))]
        test = [json.loads(x) for x in open(os.path.join(shipped, f"{task}_test.jsonl"))]
        assert not {r["prompt"] for r in rows} & {r["prompt"] for r in test}  # held out for real
        if "choices" in test[0]:
            assert all(r["completion"] == " " + r["choices"][r["label"]] for r in test)
