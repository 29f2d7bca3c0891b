"""Prometheus metrics of the server (GET /metrics), in a registry of its own.

HTTP: ``miaotui_http_requests_total{path,status}`` (every answer, by its status code). Engine:
``miaotui_requests_finished_total{finish_reason}`` (stop, length, abort: a client that went away),
``miaotui_prompt_tokens_total``, ``miaotui_generation_tokens_total``, histograms of the time to the first token,
the time per output token after the first and the end-to-end latency (from the request's arrival to its last
token), and gauges of the running and waiting requests and of the KV cache (slots in use, their share).
Speculative decoding (when on): ``miaotui_spec_draft_tokens_total``, ``miaotui_spec_accepted_tokens_total``,
``miaotui_spec_verify_steps_total``, ``miaotui_spec_skipped_steps_total`` (steps whose batch was too large to
speculate) and the gauges ``miaotui_spec_acceptance_rate`` and ``miaotui_spec_mean_accepted_length``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class ServerMetrics:
    def __init__(self, model: str, slots: int):
        r = self.registry = CollectorRegistry()
        self.http = Counter("miaotui_http_requests", "HTTP answers by path and status code", ["path", "status"],
                            registry=r)
        self.finished = Counter("miaotui_requests_finished", "Sequences finished, by finish reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("miaotui_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("miaotui_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("miaotui_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("miaotui_time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=_TPOT, registry=r)
        self.e2e = Histogram("miaotui_e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY,
                             registry=r)
        self.running = Gauge("miaotui_requests_running", "Sequences holding a KV slot", registry=r)
        self.waiting = Gauge("miaotui_requests_waiting", "Sequences waiting for a KV slot", registry=r)
        self.slots_used = Gauge("miaotui_kv_slots_used", "KV cache slots in use", registry=r)
        self.kv_usage = Gauge("miaotui_kv_cache_usage_ratio", "Share of the KV cache slots in use", registry=r)
        Gauge("miaotui_kv_slots_total", "KV cache slots", registry=r).set(slots)
        info = Gauge("miaotui_model_info", "The served model", ["model"], registry=r)
        info.labels(model=model).set(1)
        self.slots = slots
        self.spec_drafts = Counter("miaotui_spec_draft_tokens", "Draft tokens verified", registry=r)
        self.spec_accepted = Counter("miaotui_spec_accepted_tokens", "Draft tokens kept", registry=r)
        self.spec_steps = Counter("miaotui_spec_verify_steps", "Decode rows that carried drafts", registry=r)
        self.spec_skipped = Counter("miaotui_spec_skipped_steps", "Steps too large to speculate", registry=r)
        self.spec_rate = Gauge("miaotui_spec_acceptance_rate", "Draft tokens kept over drafts verified", registry=r)
        self.spec_length = Gauge("miaotui_spec_mean_accepted_length", "Tokens a verification emits on average",
                                 registry=r)
        self._spec_seen = (0, 0, 0, 0)

    def observe_engine(self, running: int, waiting: int, free_slots: int) -> None:
        used = self.slots - free_slots
        self.running.set(running)
        self.waiting.set(waiting)
        self.slots_used.set(used)
        self.kv_usage.set(used / self.slots if self.slots else 0.0)

    def observe_spec(self, stats, skipped_steps: int) -> None:
        """The scheduler's speculative counters (speculative.SpecStats), as totals since the start."""
        now = (stats.proposed, stats.accepted, stats.steps, skipped_steps)
        for counter, new, old in zip((self.spec_drafts, self.spec_accepted, self.spec_steps, self.spec_skipped), now,
                                     self._spec_seen):
            if new > old:
                counter.inc(new - old)
        self._spec_seen = now
        if stats.proposed:
            self.spec_rate.set(stats.acceptance_rate)
            self.spec_length.set(stats.mean_accepted_length)

    def observe_finish(self, reason: str, n_tokens: int, arrival: float, t_first, t_last, t_done) -> None:
        self.finished.labels(finish_reason=reason).inc()
        self.generation_tokens.inc(n_tokens)
        if t_first is not None:
            self.ttft.observe(max(t_first - arrival, 0.0))
            if n_tokens > 1 and t_last is not None:
                self.tpot.observe((t_last - t_first) / (n_tokens - 1))
        if t_done is not None:
            self.e2e.observe(max(t_done - arrival, 0.0))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class StatusCounter:
    """Pure ASGI middleware counting every HTTP answer by path and status (streams included: the status is
    counted when the response starts)."""

    KNOWN = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        path = path if path in self.KNOWN else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.http.labels(path=path, status=str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counting_send)
