"""``serve(cfg)``: the server's process layout, start-up and life cycle, on every rank.

Every rank runs its stage of the engine in its main thread (the only thread that calls torch.distributed).
Rank 0 also runs uvicorn in a second thread; requests reach the engine between steps through the bridge.

Start-up: bad keys, the model, the layout and a busy port fail in one line before any weight is read (the port
is bound by rank 0 first and the outcome shared with every rank). Then the weights, the KV cache (slots x the
model's context, or ``infer.max_seq_len``), the HTTP thread, and one line ``serving <model> on http://...``.

Stopping:
- SIGTERM or SIGINT to rank 0: stop accepting (the listener closes, new submissions get 503), let the open
  requests finish, stop the engine once idle (every rank gets the engine's STOP), tear down, exit 0. A second
  signal, at least ``REPEAT_S`` after the first, cuts the wait short; signals closer together are one stop (Slurm
  signals every process of a step, and the launcher forwards the same stop again). Other ranks ignore these
  signals and stop with rank 0. A signal during start-up is kept: the server drains (at once) when it is up.
  ``launch/torchrun.sh serve`` turns a SIGTERM or SIGINT to its process group into exactly this: torchrun itself
  ignores them (its agent would count a signal as a failure and kill the ranks after 30 s), the launcher
  forwards them to the ranks, and torchrun exits 0 when every rank has.
- A rank that dies: rank 0's engine fails on the broken link; every open request gets a 503, new ones too for
  ``serve.dead_grace_s``, then rank 0 exits 1. A surviving follower exits 1 when its link breaks. torchrun also
  stops the job when it sees a rank die. No wait is left without an end.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import threading
import time

from omegaconf import OmegaConf

from framework.cli import UserError
from framework.config import ServeRootConfig
from framework.infer.server.protocol import MAX_N

# Serving waits on its peers for as long as no request comes; a dead peer breaks the link at once (gloo reports
# the closed connection), so the process group's timeout is only a last resort.
PG_TIMEOUT_S = 30 * 24 * 3600
REPEAT_S = 1.0  # signals closer together than this are one stop


def as_serve_config(cfg) -> ServeRootConfig:
    if isinstance(cfg, ServeRootConfig):
        return cfg
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ServeRootConfig), cfg))


def read_chat_template(value: str | None) -> str | None:
    """serve.chat_template: a file holding a Jinja template, or the template itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise UserError(f"serve.chat_template={value}: neither a file nor a Jinja template")


def check_serve_keys(sc) -> None:
    if not 0 <= sc.port <= 65535:
        raise UserError(f"serve.port={sc.port}: use a port in 1-65535, or 0 for a free one")
    if sc.max_queue < 0:
        raise UserError(f"serve.max_queue={sc.max_queue}: use 0 or more waiting requests")
    if sc.max_n < 1:
        raise UserError(f"serve.max_n={sc.max_n}: at least 1 choice per request")
    if sc.default_max_tokens is not None and sc.default_max_tokens < 1:
        raise UserError(f"serve.default_max_tokens={sc.default_max_tokens}: at least 1 (or null)")
    if sc.dead_grace_s < 0:
        raise UserError(f"serve.dead_grace_s={sc.dead_grace_s}: use 0 or more seconds")
    if sc.max_n > MAX_N:
        raise UserError(f"serve.max_n={sc.max_n}: at most {MAX_N} choices per request")
    if not sc.max_body_mb > 0:
        raise UserError(f"serve.max_body_mb={sc.max_body_mb}: use a positive size in MiB (e.g. 8)")
    if sc.max_prompt_chars is not None and sc.max_prompt_chars < 1:
        raise UserError(f"serve.max_prompt_chars={sc.max_prompt_chars}: at least 1 (or null: 32 per token of context)")
    if sc.group_timeout_s < 1:
        raise UserError(f"serve.group_timeout_s={sc.group_timeout_s}: use at least 1 second (default {PG_TIMEOUT_S})")


def served_name(model_dir: str) -> str:
    """runs/x, runs/x/ and runs/x/export are all "x"."""
    path = os.path.normpath(os.path.abspath(model_dir))
    name = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if name == "export" else name


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _short(exc: Exception) -> str:
    """The gist of a communication error: gloo's source location and advice dropped."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0][:200]


def _say_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def serve(cfg) -> int:
    """Start the server on this rank and run it until it stops; returns the exit code (0 after a graceful stop;
    a broken pipeline exits 1 from inside)."""
    from framework.infer.startup import build_engine, check_engine_keys, start_stage_ranks
    from framework.parallel.distributed import broadcast_object

    cfg = as_serve_config(cfg)
    inf, sc = cfg.infer, cfg.serve
    early: list[int] = []  # a stop asked for while the server starts: kept, and honoured once it is up
    signal.signal(signal.SIGTERM, lambda sig, _frame: early.append(sig))
    signal.signal(signal.SIGINT, lambda sig, _frame: early.append(sig))
    check_serve_keys(sc)
    template = read_chat_template(sc.chat_template)
    max_batch = check_engine_keys(inf)
    st = start_stage_ranks(cfg.model_dir, inf, timeout_s=sc.group_timeout_s)  # every group's, explicitly
    context = st.args.max_seq_len
    if inf.max_seq_len is not None and not 2 <= inf.max_seq_len <= context:
        raise UserError(f"infer.max_seq_len={inf.max_seq_len}: use 2 to the model's context of {context} tokens")
    max_len = inf.max_seq_len or context

    sock, error = None, None
    if st.rank == 0:  # a busy port fails now, on every rank, before the weights are read
        try:
            sock = bind(sc.host, sc.port)
        except OSError as exc:
            error = (f"serve.host={sc.host} serve.port={sc.port}: cannot listen ({exc.strerror or exc}): pick another "
                     f"port (serve.port=0 picks a free one) or host")
    error = broadcast_object(error)
    if error:
        raise UserError(error)

    engine, slots = build_engine(inf, st.model_dir, st.args, st.stages, st.rank, st.device, st.dtype, max_batch,
                                 max_len, st.tokenizer, st.say)
    if st.rank != 0:
        return _run_follower(engine, st.rank)
    return _run_front(engine, slots, max_len, st, cfg, template, sock, early)


def _run_follower(engine, rank: int) -> int:
    from framework.parallel.distributed import destroy

    told = []

    def on_signal(sig, _frame):  # rank 0 decides when the job stops; its STOP reaches every rank
        if not told:
            told.append(sig)
            print(f"[miaotui] rank {rank}: {signal.Signals(sig).name}: stopping with rank 0", file=sys.stderr,
                  flush=True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        engine.run()
    except Exception as exc:  # noqa: BLE001 - a broken link to a peer: leave at once, non-zero
        _say_error(f"rank {rank}: the pipeline broke ({_short(exc)})")
        os._exit(1)
    destroy()
    return 0


def served_model(cfg, st, slots: int, max_len: int, template: str | None):
    """What the routes know of the model and the server's policy (server/app.py ``ServedModel``)."""
    from framework.infer.server.app import ServedModel
    from framework.infer.server.protocol import Defaults

    inf, sc = cfg.infer, cfg.serve
    return ServedModel(
        name=sc.model_name or served_name(cfg.model_dir), tokenizer=st.tokenizer, max_len=max_len,
        vocab=st.args.vocab_size, default_max_tokens=sc.default_max_tokens or inf.max_new_tokens, max_n=sc.max_n,
        defaults=Defaults(temperature=inf.temperature, top_p=inf.top_p, top_k=inf.top_k,
                          repetition_penalty=inf.repetition_penalty, stop=tuple(inf.stop), ignore_eos=inf.ignore_eos),
        chat_template=template, api_key=sc.api_key or os.environ.get("MIAOTUI_API_KEY") or None,
        created=int(time.time()), max_body_bytes=int(sc.max_body_mb * 2**20),
        max_prompt_chars=sc.max_prompt_chars or 32 * max_len, max_choices=slots + sc.max_queue)


class HttpFront:
    """Rank 0's HTTP side: uvicorn in a thread of its own on the bound socket, the bridge it feeds the engine
    through, and the stop signals received (when each came)."""

    def __init__(self, bridge, app, sock: socket.socket, sc):
        import uvicorn

        self.bridge, self.sock, self.sc = bridge, sock, sc
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                    access_log=sc.log_requests, timeout_graceful_shutdown=None))
        self.http = threading.Thread(target=asyncio.run, args=(self._serve_http(),), name="http", daemon=True)
        self.signals: list[float] = []

    async def _serve_http(self) -> None:
        self.bridge.loop = asyncio.get_running_loop()
        await self.server.serve(sockets=[self.sock])

    def on_signal(self, sig, _frame) -> None:
        """Stop accepting and drain; a second stop (or one after the engine died) cuts the wait short."""
        now = time.monotonic()
        if self.signals and now - self.signals[0] < REPEAT_S:  # the same stop, delivered twice
            return
        self.signals.append(now)
        self.bridge.draining = True
        self.server.should_exit = True
        if len(self.signals) > 1 or self.bridge.dead:
            self.server.force_exit = True
        self.bridge.wake()

    def start(self) -> None:
        """Take SIGTERM and SIGINT, start the HTTP thread and wait until uvicorn listens."""
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        self.http.start()
        while not self.server.started:
            if not self.http.is_alive():
                raise UserError(f"the HTTP server did not start on {self.sc.host}:{self.sc.port}")
            time.sleep(0.02)

    def poll(self, idle: bool) -> bool:
        """The engine's poll between steps: new requests in, and a drain once the HTTP side has ended."""
        if not self.http.is_alive():  # the HTTP side has ended: nothing more can come
            self.bridge.draining = True
        return self.bridge.poll(idle)

    def die(self, exc: Exception) -> None:
        """A rank died: answer 503 for ``serve.dead_grace_s`` (or until a stop signal), then leave non-zero."""
        reason = f"a pipeline stage failed ({_short(exc)})"
        _say_error(f"rank 0: {reason}")
        bridge, server = self.bridge, self.server
        if bridge.loop is not None:
            bridge.to_loop(bridge.fail_all, reason)
        else:
            bridge.dead = reason
        end = time.monotonic() + self.sc.dead_grace_s
        while time.monotonic() < end and not self.signals:
            time.sleep(0.05)
        server.should_exit = server.force_exit = True
        self.http.join(timeout=3)
        sys.stderr.flush()
        os._exit(1)

    def stop(self) -> None:
        """After the engine stopped: fail what came too late, then let the HTTP thread finish its answers."""
        bridge, server, http = self.bridge, self.server, self.http
        bridge.flush()
        # Whatever reached the bridge after the engine stopped cannot be served any more.
        if bridge.loop is not None and http.is_alive():
            bridge.to_loop(bridge.fail_all, "the server stopped")
        server.should_exit = True
        http.join(timeout=30)  # every answer is complete: only a client that reads slowly can hold the HTTP side
        if http.is_alive():
            server.force_exit = True
            http.join(timeout=5)


def _run_front(engine, slots: int, max_len: int, st, cfg, template: str | None, sock: socket.socket,
               early: list[int]) -> int:
    from framework.infer.server.app import build_app
    from framework.infer.server.bridge import EngineBridge
    from framework.infer.server.metrics import ServerMetrics
    from framework.parallel.distributed import destroy

    sc = cfg.serve
    model = served_model(cfg, st, slots, max_len, template)
    metrics = ServerMetrics(model.name, slots)
    bridge = EngineBridge(engine.scheduler, st.tokenizer, metrics, slots, sc.max_queue)
    front = HttpFront(bridge, build_app(bridge, model, metrics), sock, sc)
    front.start()
    host, port = sock.getsockname()[:2]
    st.say(f"[miaotui] serving {model.name} on http://{host}:{port} (pid {os.getpid()}; {slots} KV slots of "
           f"{max_len} tokens; queue {sc.max_queue}; API key {'required' if model.api_key else 'not required'})")
    if early:
        front.on_signal(early[0], None)
    try:
        engine.run(front.poll)
    except Exception as exc:  # noqa: BLE001 - a rank died: answer 503 for a moment, then leave non-zero
        front.die(exc)
    front.stop()
    destroy()
    if not front.signals:  # the HTTP thread ended by itself
        _say_error("rank 0: the HTTP server stopped unexpectedly")
        return 1
    st.say(f"[miaotui] stopped after {engine.steps} engine steps")
    return 0
