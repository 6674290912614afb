"""Prometheus metrics for one server, in its own registry (two servers in one process don't mix)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

KNOWN_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics",
               "/dashboard/billing/subscription", "/dashboard/billing/usage"}


class ServerMetrics:
    """Requests, tokens, in-flight, queue and time to first token, read by ``GET /metrics``."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tokens_used = 0  # prompt + completion since start, for NextChat's usage panel (event loop only)
        r = self.registry
        self.requests = Counter("llama_lab_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.prompt_tokens = Counter("llama_lab_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("llama_lab_completion_tokens", "completion tokens generated", registry=r)
        self.disconnects = Counter("llama_lab_client_disconnects", "requests whose client left before the end", registry=r)
        self.in_flight = Gauge("llama_lab_requests_in_flight", "generation requests being served", registry=r)
        self.ttft = Histogram("llama_lab_time_to_first_token_seconds", "time from request to first token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        stats = engine.stats
        Gauge("llama_lab_queue_waiting", "requests waiting for a batch slot", registry=r).set_function(lambda: stats.waiting)
        Gauge("llama_lab_batch_running", "requests in the decode batch", registry=r).set_function(lambda: stats.running)
        Gauge("llama_lab_engine_steps", "decode steps run by the engine", registry=r).set_function(lambda: stats.steps)
        Gauge("llama_lab_prompt_tokens_cached", "prompt tokens taken from the prefix cache instead of computed",
              registry=r).set_function(lambda: stats.prompt_tokens_cached)
        policy = engine.thread_policy  # engine/threads.py: why the engine runs the threads it runs
        Gauge("llama_lab_engine_threads", "CPU threads the engine's model work uses now",
              registry=r).set_function(lambda: policy.threads)
        Gauge("llama_lab_engine_threads_max", "threads that fit this process's CPU affinity and cgroup quota (or pinned)",
              registry=r).set_function(lambda: policy.max_threads)
        Gauge("llama_lab_cpu_used_by_others", "CPUs' worth of time other work used on the engine's cores at the last sample",
              registry=r).set_function(lambda: policy.others or 0.0)
        reason = Gauge("llama_lab_engine_threads_reason", "1 for the reason behind the thread count "
                       "(cpu_limit: every core it may use; busy: other work uses some; pinned: --threads)",
                       ["reason"], registry=r)
        for value in type(policy.reason):
            reason.labels(value.value).set_function(lambda value=value: float(policy.reason is value))
        metrics = self

        class _StatusCounter:
            """Pure ASGI (not BaseHTTPMiddleware, which would hide disconnects from streams)."""

            def __init__(self, app: Any) -> None:
                self.app = app

            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                if scope["type"] != "http":
                    return await self.app(scope, receive, send)
                path = scope.get("path", "")
                label = path if path in KNOWN_PATHS else "other"

                async def counting_send(message: Any) -> None:
                    if message["type"] == "http.response.start":
                        metrics.requests.labels(label, str(message["status"])).inc()
                    await send(message)

                await self.app(scope, receive, counting_send)

        self.asgi_middleware = _StatusCounter

    def count_tokens(self, final_delta: Any) -> None:
        self.prompt_tokens.inc(final_delta.prompt_tokens)
        self.completion_tokens.inc(final_delta.completion_tokens)
        self.tokens_used += final_delta.prompt_tokens + final_delta.completion_tokens

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
