"""The OpenAI wire format: request bodies checked by typed models, and the response and chunk objects.

The HTTP edge is the only place untrusted input enters, so nothing that reaches the engine can be malformed:
- the body is read with a size cap (413), its JSON nesting is bounded before it is decoded, and JSON's non-finite
  constants (``NaN``, ``Infinity``, and numbers too large for a float) are refused while it is decoded (400);
- the fields are pydantic models in strict mode (``extra="forbid"``: no coercion of ``"9"`` to 9 or of ``true``
  to 1), every number bounded and finite, every string valid Unicode (no lone surrogates), the stop strings
  counted and measured; a validation error becomes one line naming the field and the fix.

A known OpenAI field we cannot honour (``best_of``, ``suffix``, ``presence_penalty`` ...) is a 400 naming it,
unless it carries its neutral value (null, false, 0, 1); an unknown field is a 400 too. Nothing is silently
ignored, except ``user``, which OpenAI itself only records. (A field that becomes supported moves from
``_NEUTRAL`` to a typed field of ``_SamplingRequest`` or of its subclasses.)

Per-request sampling: ``temperature``, ``top_p``, ``max_tokens`` (chat: also ``max_completion_tokens``),
``stop``, ``seed``, ``n``; extras ``top_k``, ``repetition_penalty`` and ``ignore_eos`` (vLLM's names). What a
request leaves out comes from the server's ``infer.*`` keys (``infer.temperature=0``: greedy by default).
A temperature below ``GREEDY_BELOW`` is greedy (dividing logits by it would overflow); a ``top_k`` at or above
the vocabulary means all tokens. A request without ``seed`` that samples draws a fresh seed per choice; with
``seed`` s, choice i uses s + i.

Log-probabilities: completions take ``logprobs`` k (0-20: each token's log-probability and its k most likely
alternatives, OpenAI's legacy ``{tokens, token_logprobs, top_logprobs, text_offset}``) and ``echo`` (the prompt
comes back before the completion; with ``logprobs``, its tokens scored too: the first has none). This is what
lm-evaluation-harness's ``local-completions`` model sends (``echo: true, logprobs: 1, max_tokens: 1``) to score a
continuation. Chat takes ``logprobs: true`` and ``top_logprobs`` k (``{content: [{token, logprob, bytes,
top_logprobs}]}``). The values are the model's own (before temperature and filtering), scored by the last stage in
the same engine step that prefills or decodes the token; streamed choices carry their tokens' entries with
each text delta.

Chat prompts are rendered with the tokenizer's chat template; an export without one gets
``DEFAULT_CHAT_TEMPLATE`` (Zephyr style: ``<|role|>`` then the content and the EOS token, one turn a line,
``<|assistant|>`` opening the reply), so the model's EOS ends a turn.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from framework.data.formats import DEFAULT_CHAT_TEMPLATE  # one template for training and serving
from framework.infer.sampler import MAX_LOGPROBS

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 16  # stop strings a request may give
MAX_STOP_CHARS = 128  # characters of one stop string: the tail searched every token is this long
MAX_N = 128  # the largest serve.max_n: seeds s .. s + n - 1 must stay below 2^63
MAX_DEPTH = 16  # JSON nesting a request needs: body > messages > message > content > part is 5
INT64 = 2**63 - 1
INT32 = 2**31 - 1
GREEDY_BELOW = 1e-5  # temperatures below this are greedy (vLLM's epsilon)
MAX_REPETITION_PENALTY = 100.0  # beyond it fp32 logits overflow to inf and a zero logit times inf is NaN


class APIError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        # a client's text may hold lone surrogates, which no JSON encoder can write as UTF-8
        self.status, self.message = status, _printable(message)
        self.param, self.headers = (_printable(param) if param is not None else None), headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.status}}


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# -- the body: size, nesting, JSON ------------------------------------------------------------------------
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_OPEN, _CLOSE = np.zeros(256, np.int8), np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_CLOSE[[ord("]"), ord("}")]] = 1


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, without decoding it (brackets inside strings
    do not count): vectorized, so a body of megabytes of brackets costs milliseconds, not a recursion."""
    skeleton = np.frombuffer(_STRING.sub(b"", raw), dtype=np.uint8)
    if not skeleton.size:
        return 0
    return int(np.cumsum(_OPEN[skeleton] - _CLOSE[skeleton], dtype=np.int64).max(initial=0))


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number: send a finite number")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"the number {text[:30]} is too large for a float: send a finite number")
    return v


def decode_body(raw: bytes, max_depth: int = MAX_DEPTH):
    """The JSON value of a request body; APIError(400) for text that is not strict JSON (NaN, Infinity and
    overflowing numbers included), not UTF-8, or nested deeper than ``max_depth``."""
    depth = json_depth(raw)
    if depth > max_depth:
        raise APIError(400, f"the JSON body nests {depth} levels deep; requests need at most {max_depth}")
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the body is not UTF-8 ({exc.reason} at byte {exc.start}): send UTF-8 JSON") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; so are our refusals
        raise APIError(400, f"malformed JSON body: {str(exc).splitlines()[0].split('; use sys.')[0][:200]}") from None


# -- the request models -----------------------------------------------------------------------------------
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


def _refuse(param: str, message: str):
    """A validation error with our own one-line message (the field named in ``param``)."""
    return PydanticCustomError("miaotui", message.replace("{", "{{").replace("}", "}}"), {"param": param})


def _unicode(v: str, where: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise _refuse(where, f"'{where}' holds an unpaired UTF-16 surrogate: send valid Unicode text") from None
    return v


def _type_name(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v):
        """A string, or content parts of which only text is supported (joined)."""
        if not isinstance(v, list):
            return v
        texts = []
        for j, part in enumerate(v):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise _refuse("messages", f"'content[{j}]': only text parts are supported (got {str(kind)[:40]})")
            if set(part) - {"type", "text"}:
                raise _refuse("messages", f"'content[{j}].{sorted(set(part) - {'type', 'text'})[0][:40]}' is not "
                                          f"supported by this server")
            texts.append(part["text"])
        return "".join(texts)

    @field_validator("content", "name")
    @classmethod
    def _valid_unicode(cls, v, info):
        return _unicode(v, info.field_name) if v is not None else v


class _SamplingRequest(_Strict):
    """The fields completions and chat completions share."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1, le=INT32)] | None = None
    temperature: Annotated[Finite, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Finite, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, le=INT64 - MAX_N)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT32)] | None = None
    repetition_penalty: Annotated[Finite, Field(gt=0.0, le=MAX_REPETITION_PENALTY)] | None = None
    ignore_eos: bool | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported_fields(cls, body):
        """Drop the neutral values of the fields we do not implement; refuse any other value."""
        if not isinstance(body, dict):
            return body
        for k in body:
            _unicode(k, "field names")
        for k in [k for k in body if k in _NEUTRAL and k not in cls.model_fields]:
            v = body[k]
            if not any(v == x and type(v) is type(x) or (v is None and x is None) for x in _NEUTRAL[k]):
                raise _refuse(k, f"'{k}' is not supported by this server (got {json.dumps(v)[:60]})")
        return {k: v for k, v in body.items() if k not in _NEUTRAL or k in cls.model_fields}

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, v):
        stops = [v] if isinstance(v, str) else v
        if isinstance(stops, list) and all(isinstance(s, str) for s in stops):
            if len(stops) > MAX_STOP or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
                raise _refuse("stop", f"'stop' takes at most {MAX_STOP} non-empty strings of at most "
                                      f"{MAX_STOP_CHARS} characters")
            for s in stops:
                _unicode(s, "stop")
        elif v is not None:
            raise _refuse("stop", f"'stop' must be a string or an array of strings, got {_type_name(v)}")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise _refuse("stream_options", "'stream_options' is only allowed with 'stream': true")
        return self


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        """A string, an array of strings, an array of token ids, or an array of arrays of token ids."""
        if isinstance(v, list) and not v:
            raise _refuse("prompt", "'prompt' is empty")
        ok = isinstance(v, str) or isinstance(v, list) and (
            all(isinstance(x, str) for x in v) or all(_is_int(x) for x in v)
            or all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in v))
        if not ok:
            raise _refuse("prompt", f"'prompt' must be a string, an array of strings, or an array of token ids, "
                                    f"got {_type_name(v)}")
        for s in [v] if isinstance(v, str) else v:
            if isinstance(s, str):
                _unicode(s, "prompt")
        return v


class ChatRequest(_SamplingRequest):
    messages: list[Message]
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT32)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _non_empty(cls, v):
        if not isinstance(v, list) or not v:
            raise _refuse("messages", "'messages' must be a non-empty array of {role, content} objects")
        return v

    @model_validator(mode="after")
    def _one_max(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise _refuse("max_completion_tokens", "give 'max_tokens' or 'max_completion_tokens', not both")
        if self.top_logprobs is not None and not self.logprobs:
            raise _refuse("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        return self


def _where(loc: tuple) -> str:
    """('messages', 0, 'role') -> messages[0].role"""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(v) -> str:
    text = repr(v) if not isinstance(v, str) else json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


_KINDS = {"int_type": "an integer", "float_type": "a number", "bool_type": "a boolean", "string_type": "a string",
          "list_type": "an array", "model_type": "an object", "dict_type": "an object", "none_required": "null"}
_BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
           "less_than_equal": ("<=", "le")}


def _explain(err: dict) -> tuple[str, str | None]:
    """One pydantic error as (our one-line message, the top-level field)."""
    kind, loc, v = err["type"], tuple(p for p in err["loc"] if p not in ("str", "list[str]")), err.get("input")
    where, param = _where(loc), (str(loc[0]) if loc else None)
    if kind == "miaotui":
        inner = err["msg"]
        if len(loc) > 1 and inner.startswith(f"'{loc[-1]}"):  # a nested field's own check: say where it is
            inner = f"'{_where(loc[:-1])}.{inner[1:]}"
        return inner, err.get("ctx", {}).get("param") or param
    if kind == "extra_forbidden":
        if len(loc) == 1:
            return f"unknown field '{_printable(str(loc[0]))[:60]}'", param
        return f"'{where[:80]}' is not supported by this server", param
    if kind == "missing":
        return f"'{where}' is required", param
    if kind in _KINDS:
        return f"'{where}' must be {_KINDS[kind]}, got {_type_name(v)}", param
    if kind == "finite_number":
        return f"'{where}' must be a finite number, got {_short(v)}", param
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        bound = err["ctx"][key]
        shown = float(v) if isinstance(bound, float) and isinstance(v, (int, float)) else v
        return f"'{where}'={_short(shown)} is out of range: must be {op} {bound}", param
    if kind == "literal_error":
        return f"'{where}' must be {err['ctx']['expected'].replace(chr(39), '')}, got {_short(v)}", param
    return f"'{where}': {err['msg']}", param


# -- what the engine gets ---------------------------------------------------------------------------------
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
    echo: bool = False
    logprobs: int | None = None  # alternatives per token (0: the token's own log-probability only); None: none

    def seeds(self) -> list[int]:
        """One seed per choice."""
        if self.seed is None:
            return [secrets.randbits(62) for _ in range(self.n)]
        return [self.seed + i for i in range(self.n)]

    def prompt_chars(self) -> int:
        """Characters of text the request asks to tokenize."""
        if self.chat:
            return sum(len(m["content"]) for m in self.messages)
        return sum(len(p) for p in self.prompts if isinstance(p, str))


@dataclass
class Defaults:
    """What a request leaves out: the server's infer.* sampling keys."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


def _or(v, default):
    return default if v is None else v


def parse_request(body, chat: bool, max_n: int, defaults: Defaults | None = None,
                  vocab: int | None = None) -> ParsedRequest:
    """Check a decoded JSON body; raise APIError(400) naming the first field that is wrong. ``vocab`` clamps
    ``top_k`` (a k at or above it keeps every token)."""
    d = defaults or Defaults()
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_type_name(body)}")
    try:
        r = (ChatRequest if chat else CompletionRequest).model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # an unknown field first: a chat body sent to /v1/completions is "unknown field 'messages'", not a
        # missing prompt
        first = next((e for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1), errors[0])
        raise APIError(400, *_explain(first)) from None
    if r.n is not None and r.n > max_n:
        raise APIError(400, f"'n'={r.n} is out of range: must be <= {max_n}", "n")
    if chat:
        messages, prompts = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                             for m in r.messages], []
        max_tokens = _or(r.max_tokens, r.max_completion_tokens)
        echo, logprobs = False, (_or(r.top_logprobs, 0) if r.logprobs else None)
    else:
        p = r.prompt
        prompts = [p] if isinstance(p, str) else [list(p)] if _is_int(p[0]) else [x if isinstance(x, str) else
                                                                                   list(x) for x in p]
        messages, max_tokens = [], r.max_tokens
        echo, logprobs = bool(r.echo), r.logprobs
    top_k = max(_or(r.top_k, d.top_k), 0)
    temperature = _or(r.temperature, d.temperature)
    return ParsedRequest(
        chat=chat, prompts=prompts, messages=messages, max_tokens=max_tokens,
        temperature=0.0 if temperature < GREEDY_BELOW else temperature, top_p=_or(r.top_p, d.top_p),
        top_k=0 if vocab is not None and top_k >= vocab else top_k,
        repetition_penalty=_or(r.repetition_penalty, d.repetition_penalty), n=_or(r.n, 1),
        stream=bool(r.stream), include_usage=bool(r.stream_options and r.stream_options.include_usage),
        stop=tuple(d.stop) if r.stop is None else (r.stop,) if isinstance(r.stop, str) else tuple(r.stop),
        seed=r.seed, ignore_eos=_or(r.ignore_eos, d.ignore_eos), model=r.model, echo=echo, logprobs=logprobs)


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


def usage(prompt_tokens: int, completion_tokens: int, drafts: list | None = None) -> dict:
    """OpenAI's usage; with speculative decoding, the draft tokens kept and rejected for the request's choices
    (``drafts``: (kept, verified) of each choice that speculated) as OpenAI's prediction-token details."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if drafts:
        kept, verified = sum(d[0] for d in drafts), sum(d[1] for d in drafts)
        out["completion_tokens_details"] = {"accepted_prediction_tokens": kept,
                                            "rejected_prediction_tokens": verified - kept}
    return out


def _token_texts(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def completion_logprobs(tokenizer, ids: list[int], entries: list, offset: int = 0) -> dict:
    """OpenAI's legacy completions object for tokens ``ids`` and their entries ((logprob, [(id, logprob)]) or
    None: the first prompt token of an echo has none); ``offset`` is the first token's place in the text."""
    tokens = _token_texts(tokenizer, ids)
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    tops = []
    for e in entries:
        top = None
        if e is not None:  # ids that read as the same text keep the likelier one's value
            top = {}
            for i, lp in e[1]:
                top.setdefault(tokenizer.decode([i]), lp)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [None if e is None else e[0] for e in entries],
            "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, ids: list[int], entries: list) -> dict:
    """OpenAI's chat object: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def item(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = []
    for t, e in zip(_token_texts(tokenizer, ids), entries):
        if e is None:  # never for a generated token; kept out rather than sent as a made-up number
            continue
        content.append({**item(t, e[0]), "top_logprobs": [item(tokenizer.decode([i]), lp) for i, lp in e[1]]})
    return {"content": content}


def response(rid: str, chat: bool, model: str, created: int, choices: list[tuple], use: dict) -> dict:
    """The whole answer; choices are (text, finish_reason, logprobs object or None) in choice order."""
    if chat:
        items = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": lp, "finish_reason": f}
                 for i, (t, f, lp) in enumerate(choices)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": items,
                "usage": use}
    items = [{"index": i, "text": t, "logprobs": lp, "finish_reason": f} for i, (t, f, lp) in enumerate(choices)]
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": items,
            "usage": use}


def chunk(rid: str, chat: bool, model: str, created: int, index: int, text: str | None, finish: str | None,
          role: bool = False, logprobs: dict | None = None) -> dict:
    """One streamed event for one choice: a text delta (with its tokens' logprobs object) and/or its finish."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, chat: bool, model: str, created: int, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": use}


def now() -> int:
    return int(time.time())
