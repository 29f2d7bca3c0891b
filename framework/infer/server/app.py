"""The HTTP routes (FastAPI): OpenAI's completions and chat completions, models, health, metrics, the playground.

A generation request is read with a size cap (``serve.max_body_mb``: a larger ``Content-Length`` is a 413 before
any of the body is read, and so is a streamed body once it passes the cap), decoded and checked (protocol.py),
its text measured (``serve.max_prompt_chars``) before it is tokenized, its tokens checked against the vocabulary
and the KV slot length, and handed to the engine through the bridge, one engine request per choice.
``stream=true`` answers server-sent events, one ``data:`` line per text delta (coalesced when several are
ready), ending with ``data: [DONE]``; otherwise the answer comes when every choice has finished. A client that
disconnects cancels its choices (their KV slots are freed at the next step of their lane); every error is
OpenAI-shaped JSON with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from framework.infer.sampler import SamplingParams
from framework.infer.server import protocol as P
from framework.infer.server.bridge import EngineBridge, Event, Handle
from framework.infer.server.metrics import ServerMetrics, StatusCounter

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


@dataclass
class ServedModel:
    """What the routes need to know about the model and the server's policy."""

    name: str
    tokenizer: object
    max_len: int  # KV slot length: prompt + new tokens
    vocab: int
    default_max_tokens: int
    max_n: int
    defaults: P.Defaults
    chat_template: str | None = None
    api_key: str | None = None
    created: int = 0
    max_body_bytes: int = 8 << 20
    max_prompt_chars: int = 1 << 20  # characters of prompt text a request may ask to tokenize
    max_choices: int = 1 << 10  # prompts x n of one request: no more than the server holds at once


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes (from Content-Length, before
    reading; or while reading a body streamed without one)."""
    def too_large(size: str) -> P.APIError:
        return P.APIError(413, f"the request body is {size} bytes; this server takes at most {limit} "
                               f"(serve.max_body_mb): send a shorter prompt")

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(declared)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"more than {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@dataclass
class Echo:
    """A choice's prompt, for ``echo``: its token ids and, when it came as text, that text."""

    ids: list[int]
    given: str | None

    def text(self, tokenizer) -> str:
        return self.given if self.given is not None else tokenizer.decode(self.ids)


def merge_logprobs(parts: list[dict | None]) -> dict | None:
    """Legacy completions logprobs objects of consecutive pieces of one text, as one."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return {k: [x for p in parts for x in p[k]] for k in parts[0]}


class Routes:
    """The generation handlers and what they share: the bridge to the engine and the served model."""

    def __init__(self, bridge: EngineBridge, model: ServedModel):
        self.bridge, self.model = bridge, model

    def authorize(self, request: Request) -> None:
        if not self.model.api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.model.api_key}".encode()):
            raise P.APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")

    def encode(self, spec: P.ParsedRequest) -> list[list[int]]:
        """The request's prompts as token ids, each checked against the vocabulary and the KV slot length."""
        model = self.model
        tok = model.tokenizer
        where = "messages" if spec.chat else "prompt"
        chars = spec.prompt_chars()
        if chars > model.max_prompt_chars:  # before tokenizing: the tokenizer's time grows with the text
            raise P.APIError(400, f"the prompt has {chars} characters; this server takes at most "
                                  f"{model.max_prompt_chars} (serve.max_prompt_chars): shorten the prompt", where)
        if len(spec.prompts) * spec.n > model.max_choices:
            raise P.APIError(400, f"the request asks for {len(spec.prompts) * spec.n} choices (prompts x n) but "
                                  f"this server holds at most {model.max_choices} at once: split it", where)
        if spec.chat:
            texts = [P.render_chat(tok, spec.messages, model.chat_template)]
        else:
            texts = spec.prompts
        return [self.encode_one(p, spec, where) for p in texts]

    def encode_one(self, p: str | list[int], spec: P.ParsedRequest, where: str) -> list[int]:
        model = self.model
        if isinstance(p, list) and len(p) >= model.max_len:  # token ids: no need to look at each
            raise P.APIError(400, f"the prompt has {len(p)} tokens but the context holds {model.max_len} "
                                  f"(prompt and new tokens together): shorten the prompt", where)
        ids = p if isinstance(p, list) else model.tokenizer(p, add_special_tokens=False)["input_ids"]
        if not ids:
            raise P.APIError(400, "the prompt is empty (no tokens)", where)
        bad = [t for t in ids if not 0 <= t < model.vocab]
        if bad:
            raise P.APIError(400, f"token id {bad[0]} is outside the vocabulary of {model.vocab}", where)
        if len(ids) >= model.max_len:
            raise P.APIError(400, f"the prompt has {len(ids)} tokens but the context holds {model.max_len} "
                                  f"(prompt and new tokens together): shorten the prompt", where)
        if spec.max_tokens is not None and len(ids) + spec.max_tokens > model.max_len:
            raise P.APIError(400, f"the prompt has {len(ids)} tokens and max_tokens={spec.max_tokens}: together "
                                  f"more than the context of {model.max_len} tokens: shorten the prompt or "
                                  f"lower max_tokens", "max_tokens")
        return list(ids)

    def choices(self, spec: P.ParsedRequest, prompts: list[list[int]]) -> tuple[list[list[int]], list[SamplingParams]]:
        """One engine request per choice: each prompt ``n`` times, with the same ``n`` seeds (drawn once)."""
        ids, params = [], []
        seeds = spec.seeds()
        for p in prompts:
            for seed in seeds:
                max_new = spec.max_tokens or min(self.model.default_max_tokens, self.model.max_len - len(p))
                ids.append(p)
                params.append(SamplingParams(temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
                                             repetition_penalty=spec.repetition_penalty, max_new_tokens=max_new,
                                             seed=seed, stop=spec.stop, ignore_eos=spec.ignore_eos,
                                             logprobs=spec.logprobs,
                                             prompt_logprobs=spec.logprobs if spec.echo else None))
        return ids, params

    async def generate(self, request: Request, chat: bool):
        arrival = time.perf_counter()
        self.authorize(request)
        body = P.decode_body(await _read_body(request, self.model.max_body_bytes))
        spec = P.parse_request(body, chat, self.model.max_n, self.model.defaults, vocab=self.model.vocab)
        if spec.model is not None and spec.model != self.model.name:
            raise P.APIError(404, f"model '{spec.model[:80]}' is not served here: this server serves "
                                  f"'{self.model.name}'", "model")
        prompts = self.encode(spec)
        ids, params = self.choices(spec, prompts)
        handle = self.bridge.submit(ids, params, spec.stream, arrival)
        rid, created = P.new_id(chat), P.now()
        prompt_tokens = sum(len(p) for p in prompts)
        echoes = [Echo(p, spec.prompts[i // spec.n] if not spec.chat and isinstance(spec.prompts[i // spec.n], str)
                       else None) for i, p in enumerate(ids)] if spec.echo else None
        if spec.stream:
            return StreamingResponse(self.stream(handle, spec, rid, created, prompt_tokens, echoes),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self.answer(request, handle, spec, rid, created, prompt_tokens, echoes)

    async def answer(self, request: Request, handle: Handle, spec: P.ParsedRequest, rid: str, created: int,
                     prompt_tokens: int, echoes: list[Echo] | None):
        """The whole answer once every choice has finished; a client that leaves first cancels its choices."""
        waiter = asyncio.ensure_future(self.collect(handle))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not waiter.done():
                waiter.cancel()
                self.bridge.cancel(handle)
        if not waiter.done() or waiter.cancelled():
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        results = waiter.result()
        choices = []
        for i in range(len(handle.jobs)):
            ev, offset, text = results[i], 0, results[i].text
            parts = []
            if echoes:  # the prompt first: its text, and its tokens' entries when logprobs are asked for
                head, offset = self.echo_part(echoes[i], ev, spec)
                text = echoes[i].text(self.model.tokenizer) + text
                parts.append(head)
            parts.append(self.logprobs_part(spec, ev, offset))
            choices.append((text, ev.finish_reason, merge_logprobs(parts)))
        completion = sum(results[i].n_tokens for i in range(len(handle.jobs)))
        drafts = [results[i].drafts for i in range(len(handle.jobs)) if results[i].drafts]
        return P.response(rid, spec.chat, self.model.name, created, choices, P.usage(prompt_tokens, completion, drafts))

    @staticmethod
    async def collect(handle: Handle) -> dict[int, Event]:
        results = {}
        while len(results) < len(handle.jobs):
            ev = await handle.out.get()
            if ev.error is not None:
                raise ev.error
            if ev.finish_reason is not None:
                results[ev.choice] = ev
        return results

    def echo_part(self, echo: Echo, ev: Event, spec: P.ParsedRequest) -> tuple[dict | None, int]:
        """The echoed prompt's logprobs object (None without logprobs) and the length of its text."""
        text = echo.text(self.model.tokenizer)
        if spec.logprobs is None:
            return None, len(text)
        entries = [None] + list(ev.prompt_logprobs or [])
        return P.completion_logprobs(self.model.tokenizer, echo.ids, entries[: len(echo.ids)]), len(text)

    def logprobs_part(self, spec: P.ParsedRequest, ev: Event, offset: int) -> dict | None:
        """The logprobs object of an event's tokens (None when the request did not ask for logprobs)."""
        if spec.logprobs is None or ev.logprobs is None:
            return None
        if spec.chat:
            return P.chat_logprobs(self.model.tokenizer, ev.token_ids, ev.logprobs)
        return P.completion_logprobs(self.model.tokenizer, ev.token_ids, ev.logprobs, offset)

    async def stream(self, handle: Handle, spec: P.ParsedRequest, rid: str, created: int, prompt_tokens: int,
                     echoes: list | None = None):
        chat, name = spec.chat, self.model.name
        left, completion, drafts = len(handle.jobs), 0, []
        offsets: dict[int, int] = {}  # choice -> characters streamed so far (completions' text_offset)
        try:
            if chat:
                yield "".join(_sse(P.chunk(rid, True, name, created, j.choice, None, None, role=True))
                              for j in handle.jobs)
            while left:
                batch = [await handle.out.get()]
                while not handle.out.empty():
                    batch.append(handle.out.get_nowait())
                parts = []
                for ev in batch:
                    if ev.error is not None:
                        parts.append(_sse(ev.error.body()))
                        yield "".join(parts)
                        return
                    if ev.finish_reason is not None:
                        left -= 1
                        completion += ev.n_tokens
                        if ev.drafts:
                            drafts.append(ev.drafts)
                    if echoes and ev.choice not in offsets:  # the prompt comes back first, in a chunk of its own
                        head, offsets[ev.choice] = self.echo_part(echoes[ev.choice], ev, spec)
                        parts.append(_sse(P.chunk(rid, chat, name, created, ev.choice,
                                                  echoes[ev.choice].text(self.model.tokenizer), None, logprobs=head)))
                    offset = offsets.get(ev.choice, 0)
                    offsets[ev.choice] = offset + len(ev.text)
                    if ev.text or ev.finish_reason is not None:
                        parts.append(_sse(P.chunk(rid, chat, name, created, ev.choice, ev.text, ev.finish_reason,
                                                  logprobs=self.logprobs_part(spec, ev, offset))))
                if parts:
                    yield "".join(parts)
            if spec.include_usage:
                yield _sse(P.usage_chunk(rid, chat, name, created, P.usage(prompt_tokens, completion, drafts)))
            yield "data: [DONE]\n\n"
        finally:
            self.bridge.cancel(handle)  # a no-op for the choices that finished


def add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's (404, 405), as OpenAI-shaped JSON."""

    @app.exception_handler(P.APIError)
    async def api_error(_request, exc: P.APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return JSONResponse(P.APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)


def add_info_routes(app: FastAPI, routes: Routes, metrics: ServerMetrics) -> None:
    """The playground page, health, Prometheus metrics and the model list."""
    bridge, model = routes.bridge, routes.model
    with open(os.path.join(STATIC, "playground.html"), encoding="utf-8") as f:
        page = f.read()

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        status = "dead" if bridge.dead else "draining" if bridge.draining else "ok"
        body = {"status": status, "model": model.name, "auth": bool(model.api_key), "pid": os.getpid()}
        if bridge.dead:
            body["reason"] = bridge.dead
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus():
        data, kind = metrics.exposition()
        return Response(data, media_type=kind)

    @app.get("/v1/models")
    async def models(request: Request):
        routes.authorize(request)
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": model.created,
                                            "owned_by": "miaotui", "max_model_len": model.max_len}]}


def add_generation_routes(app: FastAPI, routes: Routes) -> None:
    """OpenAI's completions and chat completions."""

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await routes.generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await routes.generate(request, chat=True)


def build_app(bridge: EngineBridge, model: ServedModel, metrics: ServerMetrics):
    """The ASGI application (FastAPI wrapped in the status-counting middleware)."""
    app = FastAPI(title="Miaotui", docs_url=None, redoc_url=None, openapi_url=None)
    routes = Routes(bridge, model)
    add_error_handlers(app)
    add_info_routes(app, routes, metrics)
    add_generation_routes(app, routes)
    return StatusCounter(app, metrics)
