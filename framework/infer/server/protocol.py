"""The OpenAI wire format: request bodies checked field by field, and the response and chunk objects.

A request is accepted only when every field in it is understood. A known OpenAI field we cannot honour
(``logprobs``, ``echo``, ``presence_penalty`` ...) is a 400 naming it, unless it carries its neutral value
(null, false, 0, 1); an unknown field is a 400 too. Nothing is silently ignored, except ``user``, which OpenAI
itself only records.

Per-request sampling: ``temperature``, ``top_p``, ``max_tokens`` (chat: also ``max_completion_tokens``),
``stop``, ``seed``, ``n``; extras ``top_k``, ``repetition_penalty`` and ``ignore_eos`` (vLLM's names). What a
request leaves out comes from the server's ``infer.*`` keys (``infer.temperature=0``: greedy by default).
A request without ``seed`` that samples draws a fresh seed per choice; with ``seed`` s, choice i uses s + i.

Chat prompts are rendered with the tokenizer's chat template; an export without one gets
``DEFAULT_CHAT_TEMPLATE`` (Zephyr style: ``<|role|>`` then the content and the EOS token, one turn a line,
``<|assistant|>`` opening the reply), so the model's EOS ends a turn.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import dataclass, field

DEFAULT_CHAT_TEMPLATE = (
    "{%- for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{%- endif %}"
)

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 16
INT64 = 2**63 - 1


class APIError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.status}}


# Fields of OpenAI's API we do not implement, and the values that mean "not used" (accepted).
_NEUTRAL = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "tool_choice": (None, "none", "auto"),
    "functions": (None, []), "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None, True, False), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "reasoning_effort": (None,), "service_tier": (None, "auto", "default"),
    "store": (None, False), "metadata": (None, {}), "web_search_options": (None,),
}
_SAMPLING = ("model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
             "top_k", "repetition_penalty", "ignore_eos", "user")
COMPLETION_FIELDS = frozenset(_SAMPLING + ("prompt",))
CHAT_FIELDS = frozenset(_SAMPLING + ("messages", "max_completion_tokens"))


@dataclass
class ParsedRequest:
    """A checked request: what the engine needs, and how to answer."""

    chat: bool
    prompts: list  # str or list[int] each (chat: one rendered string)
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    n: int
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    seed: int | None
    ignore_eos: bool
    model: str | None
    messages: list = field(default_factory=list)

    def seeds(self) -> list[int]:
        """One seed per choice."""
        if self.seed is None:
            return [secrets.randbits(62) for _ in range(self.n)]
        return [self.seed + i for i in range(self.n)]


def _type_name(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _get(body: dict, name: str, kind, default, low=None, high=None, low_open=False):
    """body[name] checked against kind (int, float, bool, str) and an inclusive range [low, high] (open at low
    when low_open); null means the default."""
    v = body.get(name)
    if v is None:
        return default
    ok = {int: isinstance(v, int) and not isinstance(v, bool),
          float: isinstance(v, (int, float)) and not isinstance(v, bool),
          bool: isinstance(v, bool), str: isinstance(v, str)}[kind]
    if not ok:
        want = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}[kind]
        raise APIError(400, f"'{name}' must be {want}, got {_type_name(v)}", name)
    if kind is float:
        v = float(v)
    if low is not None and (v <= low if low_open else v < low):
        raise APIError(400, f"'{name}'={v} is out of range: must be {'>' if low_open else '>='} {low}"
                            f"{f' and <= {high}' if high is not None else ''}", name)
    if high is not None and v > high:
        raise APIError(400, f"'{name}'={v} is out of range: must be <= {high}", name)
    return v


def _check_fields(body: dict, allowed: frozenset) -> None:
    for k, v in body.items():
        if k in allowed:
            continue
        if k in _NEUTRAL:
            if any(v == x and type(v) is type(x) or (v is None and x is None) for x in _NEUTRAL[k]):
                continue
            raise APIError(400, f"'{k}' is not supported by this server (got {json.dumps(v)[:60]})", k)
        raise APIError(400, f"unknown field '{k}'", k)


def _parse_prompt(v) -> list:
    """A string, an array of strings, an array of token ids, or an array of arrays of token ids."""
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v:
        if all(isinstance(x, str) for x in v):
            return list(v)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            return [list(v)]
        if all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in v):
            return [list(x) for x in v]
    if isinstance(v, list) and not v:
        raise APIError(400, "'prompt' is empty", "prompt")
    raise APIError(400, f"'prompt' must be a string, an array of strings, or an array of token ids, got "
                        f"{_type_name(v)}", "prompt")


def _parse_messages(v) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise APIError(400, "'messages' must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"'{where}' must be an object, got {_type_name(m)}", "messages")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise APIError(400, f"'{where}.{sorted(extra)[0]}' is not supported by this server", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"'{where}.role' must be one of {', '.join(ROLES)}, got {json.dumps(role)}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                    raise APIError(400, f"'{where}.content[{j}]': only text parts are supported (got {kind})",
                                   "messages")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise APIError(400, f"'{where}.content' must be a string or an array of text parts, got "
                                f"{_type_name(content)}", "messages")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


@dataclass
class Defaults:
    """What a request leaves out: the server's infer.* sampling keys."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


def parse_request(body, chat: bool, max_n: int, defaults: Defaults | None = None) -> ParsedRequest:
    """Check a decoded JSON body; raise APIError(400) naming the first field that is wrong."""
    d = defaults or Defaults()
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_type_name(body)}")
    _check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    if chat:
        if "messages" not in body:
            raise APIError(400, "'messages' is required", "messages")
        messages, prompts = _parse_messages(body["messages"]), []
    else:
        if body.get("prompt") is None:
            raise APIError(400, "'prompt' is required", "prompt")
        messages, prompts = [], _parse_prompt(body["prompt"])
    max_tokens = _get(body, "max_tokens", int, None, low=1)
    if chat and body.get("max_completion_tokens") is not None:
        if max_tokens is not None:
            raise APIError(400, "give 'max_tokens' or 'max_completion_tokens', not both", "max_completion_tokens")
        max_tokens = _get(body, "max_completion_tokens", int, None, low=1)
    stream = _get(body, "stream", bool, False)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise APIError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise APIError(400, "'stream_options' supports only {\"include_usage\": bool}", "stream_options")
        include_usage = _get(opts, "include_usage", bool, False)
    stop = body.get("stop")
    if stop is None:
        stop = tuple(d.stop)
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise APIError(400, f"'stop' must be a string or an array of strings, got {_type_name(stop)}", "stop")
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise APIError(400, f"'stop' takes at most {MAX_STOP} non-empty strings", "stop")
    model = _get(body, "model", str, None)
    _get(body, "user", str, None)
    top_k = _get(body, "top_k", int, d.top_k, low=-1)
    return ParsedRequest(
        chat=chat, prompts=prompts, messages=messages, max_tokens=max_tokens,
        temperature=_get(body, "temperature", float, d.temperature, low=0.0, high=2.0),
        top_p=_get(body, "top_p", float, d.top_p, low=0.0, high=1.0, low_open=True),
        top_k=max(top_k, 0),
        repetition_penalty=_get(body, "repetition_penalty", float, d.repetition_penalty, low=0.0, low_open=True),
        n=_get(body, "n", int, 1, low=1, high=max_n), stream=stream, include_usage=include_usage, stop=stop,
        seed=_get(body, "seed", int, None, low=0, high=INT64 - max_n), ignore_eos=_get(body, "ignore_eos", bool, d.ignore_eos),
        model=model)


def render_chat(tokenizer, messages: list[dict], template: str | None) -> str:
    """The prompt text of a conversation: the override, else the tokenizer's template, else the default."""
    tmpl = template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(messages, chat_template=tmpl, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - a template's own check (e.g. role order) is the client's error
        raise APIError(400, f"the chat template refused the messages: {exc}", "messages") from None


# -- responses --------------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(rid: str, chat: bool, model: str, created: int, choices: list[tuple[str, str]], use: dict) -> dict:
    """The whole answer; choices are (text, finish_reason) in choice order."""
    if chat:
        items = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": f}
                 for i, (t, f) in enumerate(choices)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": items,
                "usage": use}
    items = [{"index": i, "text": t, "logprobs": None, "finish_reason": f} for i, (t, f) in enumerate(choices)]
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": items,
            "usage": use}


def chunk(rid: str, chat: bool, model: str, created: int, index: int, text: str | None, finish: str | None,
          role: bool = False) -> dict:
    """One streamed event for one choice: a text delta and/or its finish reason."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, chat: bool, model: str, created: int, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": use}


def now() -> int:
    return int(time.time())
