"""The gateway's Prometheus metrics, in its own registry (two gateways in one process do not mix).

Counters and histograms are this process's: with several gateways on one database, Prometheus scrapes
each and sums them. The channel and token states are read from the shared database at scrape time, so
every gateway reports the same quota left.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llama_lab.gateway.routing import Router
from llama_lab.gateway.store import Store

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OVERHEAD_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class _State(Collector):
    """Channel and token state, read when Prometheus scrapes."""

    def __init__(self, store: Store, router: Router) -> None:
        self.store, self.router = store, router

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("llama_lab_gateway_channel_up",
                               "1 if the channel takes requests (enabled and not auto-disabled)", labels=["channel"])
        failures = GaugeMetricFamily("llama_lab_gateway_channel_failures",
                                     "consecutive failures this gateway has seen on the channel", labels=["channel"])
        in_flight = GaugeMetricFamily("llama_lab_gateway_channel_in_flight",
                                      "requests on the channel now (this gateway's, and the others' at the last "
                                      "exchange when routing is least-busy or latency)", labels=["channel"])
        for channel in self.store.list_channels():
            up.add_metric([channel.name], float(channel.enabled and not channel.auto_disabled))
            failures.add_metric([channel.name], float(self.router.failures(channel.id)))
            in_flight.add_metric([channel.name], float(self.router.in_flight(channel.id)))
        used = GaugeMetricFamily("llama_lab_gateway_token_used_tokens", "tokens the token has been charged",
                                 labels=["token"])
        left = GaugeMetricFamily("llama_lab_gateway_token_quota_remaining_tokens",
                                 "quota left (quota - used - held by requests in flight); tokens with a quota",
                                 labels=["token"])
        for name, spent, reserved, quota in self.store.quota_states():
            used.add_metric([name], float(spent))
            if quota is not None:
                left.add_metric([name], float(max(quota - spent - reserved, 0)))
        yield from (up, failures, in_flight, used, left)


class GatewayMetrics:
    """What ``GET /metrics`` reports: requests, latency, first byte, the gateway's own overhead, tokens."""

    def __init__(self, store: Store, router: Router) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = ["channel", "token", "model", "status"]
        self.requests = Counter("llama_lab_gateway_requests", "requests by channel, token, model and status", labels,
                                registry=r)
        self.tokens = Counter("llama_lab_gateway_tokens", "tokens charged, by channel, token and kind (prompt, completion)",
                              ["channel", "token", "kind"], registry=r)
        self.latency = Histogram("llama_lab_gateway_request_seconds", "from the request's arrival to its last byte",
                                 ["channel"], buckets=SECONDS, registry=r)
        self.first_byte = Histogram("llama_lab_gateway_first_byte_seconds",
                                    "from the request's arrival to the backend's first byte (TTFT when streaming)",
                                    ["channel"], buckets=SECONDS, registry=r)
        self.overhead = Histogram("llama_lab_gateway_overhead_seconds",
                                  "the gateway's own time before the answer starts (auth, quota, routing, proxying), "
                                  "without the time spent waiting for backends", buckets=OVERHEAD_SECONDS, registry=r)
        self.in_flight = Gauge("llama_lab_gateway_requests_in_flight", "requests this gateway is relaying", registry=r)
        r.register(_State(store, router))

    def observe(self, entry: dict[str, Any], overhead_s: float | None) -> None:
        """One settled request (the usage log's row)."""
        channel = entry.get("channel_name") or ""
        token = entry.get("token_name") or ""
        self.requests.labels(channel, token, entry.get("model") or "", str(entry["status"])).inc()
        if entry.get("prompt_tokens"):
            self.tokens.labels(channel, token, "prompt").inc(entry["prompt_tokens"])
        if entry.get("completion_tokens"):
            self.tokens.labels(channel, token, "completion").inc(entry["completion_tokens"])
        self.latency.labels(channel).observe(entry["latency_ms"] / 1000)
        if entry.get("first_byte_ms") is not None:
            self.first_byte.labels(channel).observe(entry["first_byte_ms"] / 1000)
        if overhead_s is not None:
            self.overhead.observe(overhead_s)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
