"""Which channel serves a request: priority, then weight, load or latency; failure counting, auto-disable, health probe.

Least-busy and latency routing hold across gateway processes: each publishes its in-flight count per
channel to the shared database every ``load_refresh`` seconds and reads the others' (rows of a
process that stopped are ignored once stale); latency is the mean time to first byte of each channel's
answers in the request log over the last five minutes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from itertools import groupby

import httpx

from llama_lab.gateway.schemas import Channel, ChannelTestResult
from llama_lab.gateway.settings import GatewaySettings
from llama_lab.gateway.store import Store

log = logging.getLogger(__name__)


def upstream_url(base_url: str, path: str) -> str:
    """``path`` under the channel's OpenAI base; base URLs are accepted with or without ``/v1``."""
    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return base + path


def upstream_headers(channel: Channel) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if channel.api_key:
        headers["authorization"] = f"Bearer {channel.api_key}"
    return headers


def describe_failure(exc: BaseException, url: str, settings: GatewaySettings | None = None) -> str:
    """Say what went wrong at which address, in words that point at the fix."""
    connect_s = settings.connect_timeout if settings else None
    read_s = settings.first_byte_timeout if settings else None
    if isinstance(exc, httpx.ConnectTimeout):
        return f"no answer from {url} within {connect_s or '?'} s (connect timeout): is the address reachable from the gateway?"
    if isinstance(exc, httpx.ConnectError):
        text = str(exc)
        if "Name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text:
            return f"cannot resolve the host in {url}: check the channel's base_url"
        hint = ""
        if "127.0.0.1" in url or "localhost" in url:
            hint = " (127.0.0.1 is the gateway's own machine: use the backend's LAN address if it runs elsewhere)"
        return f"connection refused at {url}: is the backend running at that address?{hint}"
    if isinstance(exc, httpx.ReadTimeout):
        return f"{url} accepted the connection but sent nothing for {read_s or '?'} s (read timeout)"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"{url} closed the connection unexpectedly ({exc})"
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__} talking to {url}: {exc}"
    return f"{type(exc).__name__}: {exc}"


def weighted_order(channels: list[Channel], rng: random.Random) -> list[Channel]:
    """Highest priority first; inside a priority, a weighted random order without repeats.

    Efraimidis-Spirakis keys (u ** (1/w)) give each channel a chance proportional to its weight
    of coming first; weight 0 channels come last in their priority, as spares.
    """
    ordered: list[Channel] = []
    by_priority = sorted(channels, key=lambda c: -c.priority)
    for _prio, group in groupby(by_priority, key=lambda c: c.priority):
        keyed = [((rng.random() ** (1.0 / c.weight)) if c.weight > 0 else -1.0, c) for c in group]
        ordered.extend(c for _k, c in sorted(keyed, key=lambda kc: -kc[0]))
    return ordered


def routed_order(channels: list[Channel], strategy: str, rng: random.Random, *, load: dict[int, int] | None = None,
                 first_byte_ms: dict[int, float] | None = None) -> list[Channel]:
    """Highest priority first; inside a priority, the strategy's order.

    ``weighted``: a weighted random order. ``least-busy``: fewest requests in flight first. ``latency``:
    lowest recent time to first byte first, and a channel with no recent answers before any (so it gets
    measured). Ties keep the weighted random order, and weight-0 spares stay last in their priority.
    """
    ordered = weighted_order(channels, rng)
    if strategy == "weighted":
        return ordered
    load, first_byte_ms = load or {}, first_byte_ms or {}

    def key(c: Channel) -> tuple[int, int, float]:
        spare = 1 if c.weight == 0 else 0
        if strategy == "least-busy":
            return -c.priority, spare, float(load.get(c.id, 0))
        return -c.priority, spare, first_byte_ms.get(c.id, -1.0)

    return sorted(ordered, key=key)  # stable: ties keep the weighted order


class Router:
    """Picks channels and keeps their health; one per gateway process.

    The channel table is cached for ``channel_cache_ttl`` seconds so the hot path does no DB
    round trip; auto-disable is written to the DB so other processes sharing it see it too.
    """

    def __init__(self, store: Store, settings: GatewaySettings, rng: random.Random | None = None) -> None:
        self.store = store
        self.settings = settings
        self.rng = rng or random.Random()
        self._channels: list[Channel] = []
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()
        self._failures: dict[int, int] = {}
        self.instance = uuid.uuid4().hex  # this process, in the shared load table
        self._local: dict[int, int] = {}  # requests this process has in flight, per channel
        self._others: dict[int, int] = {}  # the other processes' (last exchange)
        self._first_byte_ms: dict[int, float] = {}  # recent mean time to first byte, per channel

    async def channels(self) -> list[Channel]:
        if time.monotonic() - self._loaded_at > self.settings.channel_cache_ttl:
            async with self._lock:
                if time.monotonic() - self._loaded_at > self.settings.channel_cache_ttl:
                    self._channels = await self.store.run(self.store.channels)
                    self._loaded_at = time.monotonic()
        return self._channels

    def invalidate(self) -> None:
        self._loaded_at = float("-inf")

    async def candidates(self, model: str) -> list[Channel]:
        usable = [c for c in await self.channels() if c.enabled and not c.auto_disabled and c.serves(model)]
        load = {cid: self._local.get(cid, 0) + self._others.get(cid, 0) for cid in {*self._local, *self._others}}
        return routed_order(usable, self.settings.routing, self.rng, load=load,
                            first_byte_ms=self._first_byte_ms)[: self.settings.max_attempts]

    def started(self, channel: Channel) -> None:
        """A request went to ``channel`` (least-busy routing counts it until ``finished``)."""
        self._local[channel.id] = self._local.get(channel.id, 0) + 1

    def finished(self, channel: Channel) -> None:
        left = self._local.get(channel.id, 0) - 1
        if left > 0:
            self._local[channel.id] = left
        else:
            self._local.pop(channel.id, None)

    def in_flight(self, channel_id: int) -> int:
        """Requests on a channel now, this process's and the others' at the last exchange."""
        return self._local.get(channel_id, 0) + self._others.get(channel_id, 0)

    async def exchange_stats_once(self) -> None:
        """Publish this process's loads and read the others', and the channels' recent latency."""
        fresh_after = time.time() - max(5.0, 4 * self.settings.load_refresh)
        self._others = await self.store.run(self.store.exchange_loads, self.instance, dict(self._local), fresh_after)
        if self.settings.routing == "latency":
            self._first_byte_ms = await self.store.run(self.store.recent_first_byte, time.time() - 300.0)

    async def exchange_stats_forever(self) -> None:
        if self.settings.routing == "weighted":  # the order needs no statistics
            return
        while True:
            try:
                await self.exchange_stats_once()
            except Exception:  # routing falls back on the last figures; a DB hiccup must not stop it
                log.exception("could not exchange routing statistics")
            await asyncio.sleep(self.settings.load_refresh)

    async def unavailable_message(self, model: str) -> str:
        channels = await self.channels()
        serving = [c for c in channels if c.serves(model)]
        if not serving:
            known = sorted({m for c in channels if c.enabled for m in (*c.models, *c.model_mapping)})
            listed = ", ".join(known) if known else "none (add a channel with `llama-lab gateway channel add`)"
            return f"No channel serves model '{model}'. Models available through this gateway: {listed}."
        off = [f"'{c.name}' ({'auto-disabled: ' + (c.disabled_reason or 'failures') if c.auto_disabled else 'disabled'})" for c in serving]
        return f"No channel available for model '{model}': every channel serving it is disabled: {', '.join(off)}."

    async def models(self) -> list[str]:
        return sorted({m for c in await self.channels() if c.enabled and not c.auto_disabled for m in (*c.models, *c.model_mapping)})

    def failures(self, channel_id: int) -> int:
        """Consecutive failures this process has seen on a channel (reset by a success)."""
        return self._failures.get(channel_id, 0)

    async def record_success(self, channel: Channel) -> None:
        self._failures.pop(channel.id, None)

    async def record_failure(self, channel: Channel, reason: str) -> None:
        count = self._failures.get(channel.id, 0) + 1
        self._failures[channel.id] = count
        log.warning("channel %r failed (%d in a row): %s", channel.name, count, reason)
        if count >= self.settings.failure_threshold:
            why = f"{count} consecutive failures, last: {reason}"
            log.warning("disabling channel %r until it answers again: %s", channel.name, why)
            await self.store.run(self.store.set_auto_disabled, channel.id, True, why)
            self._failures.pop(channel.id, None)
            self.invalidate()

    async def probe_once(self, client: httpx.AsyncClient) -> None:
        """Re-enable auto-disabled channels whose /v1/models answers again."""
        self.invalidate()
        for channel in await self.channels():
            if not (channel.enabled and channel.auto_disabled):
                continue
            try:
                resp = await client.get(
                    upstream_url(channel.base_url, "/models"),
                    headers=upstream_headers(channel),
                    timeout=self.settings.connect_timeout,
                )
                healthy = resp.status_code < 500
            except httpx.HTTPError:
                healthy = False
            if healthy:
                log.info("channel %r answers again: re-enabled", channel.name)
                await self.store.run(self.store.set_auto_disabled, channel.id, False)
                self._failures.pop(channel.id, None)
                self.invalidate()

    async def probe_forever(self, client: httpx.AsyncClient) -> None:
        while True:
            await asyncio.sleep(self.settings.probe_interval)
            try:
                await self.probe_once(client)
            except Exception:  # the probe must outlive a DB hiccup
                log.exception("health probe failed")


async def test_channel(client: httpx.AsyncClient, channel: Channel, settings: GatewaySettings) -> ChannelTestResult:
    """Send a real one-token chat request and report the latency, or what was wrong."""
    result = ChannelTestResult(channel_id=channel.id, name=channel.name, ok=False)
    started = time.perf_counter()
    try:
        model = channel.models[0] if channel.models else None
        if model is None:
            url = upstream_url(channel.base_url, "/models")
            resp = await client.get(url, headers=upstream_headers(channel), timeout=settings.connect_timeout)
            if resp.status_code != 200:
                result.status_code = resp.status_code
                result.error = f"GET {url} answered HTTP {resp.status_code}: {resp.text[:300]}"
                return result
            data = resp.json().get("data") or []
            if not data:
                result.error = f"{url} lists no models; set the channel's models"
                return result
            model = data[0]["id"]
        result.model = model
        url = upstream_url(channel.base_url, "/chat/completions")
        body = {
            "model": channel.upstream_model(model),
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1,
            "stream": False,
        }
        resp = await client.post(url, json=body, headers=upstream_headers(channel))
        result.status_code = resp.status_code
        result.latency_ms = round((time.perf_counter() - started) * 1000, 1)
        if resp.status_code != 200:
            result.error = f"POST {url} answered HTTP {resp.status_code}: {resp.text[:300]}"
        else:
            result.ok = True
    except httpx.HTTPError as exc:
        result.error = describe_failure(exc, channel.base_url, settings)
    except ValueError as exc:
        result.error = f"{channel.base_url} did not answer JSON: {exc}"
    return result
