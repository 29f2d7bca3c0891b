"""Fine-tuning formats: a row of a dataset -> token ids and a loss mask.

``data.format`` names how a row is read (``auto`` detects it from the row's fields):

- ``text``: ``{"text"}``; every token counts.
- ``prompt_completion``: ``{"prompt", "completion"}``; the completion's tokens and the EOS after it count.
- ``messages``: ``{"messages": [{"role", "content"}, ...]}`` (optional system turns) rendered with the tokenizer's
  chat template; each assistant turn's tokens, through its end-of-turn token, count.
- ``alpaca``: ``{"instruction", "input", "output"}``: the Alpaca prompt, then the output as the completion.

With ``data.train_on_prompt=true`` every token counts (the prompt is trained on too).

The prompt and each answer are tokenized as separate pieces, the way the model meets them when it is used: the
prompt (or the conversation rendered with ``add_generation_prompt``) is tokenized alone and the model writes the
rest. A tokenizer without a chat template (our trained BPE) gets ``DEFAULT_CHAT_TEMPLATE``, which the trainer saves
with the run's tokenizer, so the export, ``framework.generate`` and ``framework.serve`` render conversations exactly
as training did.
"""

from __future__ import annotations

import json

from framework.cli import UserError

FORMATS = ("text", "prompt_completion", "messages", "alpaca")

# Zephyr style: "<|role|>" then the content and the EOS token, a turn a line; "<|assistant|>" opens the reply, so
# the model's EOS ends its turn (and generation).
DEFAULT_CHAT_TEMPLATE = (
    "{%- for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{%- endif %}"
)

ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")

_FIELDS = {"messages": ("messages",), "alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
           "text": ("text",)}


def detect_format(row: dict) -> str:
    """The format a row's fields say (``data.format=auto``)."""
    for fmt, fields in _FIELDS.items():
        if all(f in row for f in fields):
            return fmt
    raise UserError(f"cannot tell the format of a row with fields {sorted(row)[:6]}: give data.format= one of "
                    f"{', '.join(FORMATS)} and rows with its fields (text | prompt, completion | messages | "
                    "instruction, input, output)")


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the project's default (saved with it by the caller)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


def _pieces(row: dict, fmt: str, tok) -> list[tuple[str, bool]]:
    """The row as text pieces, each with whether the loss counts it."""
    if fmt == "text":
        return [(row["text"], True), (tok.eos_token, True)]
    if fmt == "prompt_completion":
        return [(row["prompt"], False), (row["completion"], True), (tok.eos_token, True)]
    if fmt == "alpaca":
        extra = row.get("input") or ""
        prompt = ALPACA_PROMPT.format(ctx=", paired with an input that provides further context" if extra else "",
                                      instruction=row["instruction"], input=f"### Input:\n{extra}\n\n" if extra else "")
        return [(prompt, False), (row["output"], True), (tok.eos_token, True)]
    if fmt == "messages":
        return _message_pieces(row["messages"], tok)
    raise UserError(f"data.format={fmt}: use one of {', '.join(FORMATS)} or auto")


def _render(tok, messages: list[dict], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _message_pieces(messages, tok) -> list[tuple[str, bool]]:
    """Each assistant turn is the text its rendering adds to the conversation before it (rendered with the
    generation prompt): exactly what the model writes when it answers; everything else is context."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise UserError("a 'messages' row must be a non-empty list of {role, content} objects")
    ensure_chat_template(tok)
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = _render(tok, messages[:i], generation_prompt=True)
        through = _render(tok, messages[: i + 1], generation_prompt=False)
        if not before.startswith(done) or not through.startswith(before):
            raise UserError("the chat template does not render a conversation as a prefix of its continuation: "
                            "use a template that appends turns (or data.format=prompt_completion)")
        pieces += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    rest = _render(tok, messages, generation_prompt=False)[len(done):]
    if rest:
        pieces.append((rest, False))
    if not any(train for _, train in pieces):
        raise UserError("a 'messages' row has no assistant turn: nothing to learn from it")
    return pieces


def render_pieces(row: dict, fmt: str, tok, train_on_prompt: bool) -> list[tuple[str, bool]]:
    """The row as text pieces, each with whether the loss counts it; ``fmt`` may be ``auto``."""
    if not isinstance(row, dict):
        raise UserError(f"a {fmt} row must be a JSON object, got {type(row).__name__}")
    if fmt == "auto":
        fmt = detect_format(row)
    missing = [f for f in _FIELDS.get(fmt, ()) if f not in row]
    if missing:
        raise UserError(f"a row has no '{missing[0]}' field (fields: {sorted(row)[:6]}) for data.format={fmt}: fix the "
                        "data or choose the format its rows have")
    return [(text, train or train_on_prompt) for text, train in _pieces(row, fmt, tok) if text]


def render_row(text: str, fmt: str, tok, train_on_prompt: bool) -> list[tuple[str, bool]]:
    """``render_pieces`` of a row that travelled as its JSON text (sources.row_text)."""
    return render_pieces(json.loads(text), fmt, tok, train_on_prompt)


def row_strings(text: str) -> list[str]:
    """Every string inside a row's JSON text (what a BPE trained on fine-tuning data learns from)."""
    out, stack = [], [json.loads(text)]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return out


def encode_example(row: dict, fmt: str, tok, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """(token ids, loss mask of 0/1 per token) of one row; ``fmt`` may be ``auto``."""
    ids, mask = [], []
    for text, train in render_pieces(row, fmt, tok, train_on_prompt):
        piece = _encode(tok, text)
        ids += piece
        mask += [int(train)] * len(piece)
    return ids, mask
