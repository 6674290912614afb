"""Relaying one request to a backend: retries before the first byte, SSE pass-through, usage.

The relay is an ASGI response that owns the whole upstream exchange, so one watcher on the
client connection covers it all: when the client goes away, the upstream request is closed at
once (the backend then stops generating), whether we were waiting for the first token, streaming,
or reading a non-streamed answer.
"""

from __future__ import annotations

import json
import logging
import re
import string
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from llama_lab.gateway.body import JsonObject, off_loop_if_large
from llama_lab.gateway.metrics import GatewayMetrics
from llama_lab.gateway.quota import Reservations, estimate_prompt_tokens
from llama_lab.gateway.routing import Router, describe_failure, upstream_headers, upstream_url
from llama_lab.gateway.schemas import Channel, TokenOut
from llama_lab.gateway.settings import GatewaySettings
from llama_lab.web.errors import error_body

log = logging.getLogger(__name__)

_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')
_HAS_USAGE = re.compile(rb'"usage"\s*:\s*\{')
DONE = b"data: [DONE]\n\n"
_HEADER_SAFE = "".join(c for c in string.punctuation if c != "%") + " "


@dataclass
class ProxyCall:
    """What the route learned from the client's request; the relay needs nothing else."""

    path: str  # "/chat/completions" or "/completions"
    body: dict[str, Any]
    source: JsonObject  # the client's JSON text: sent upstream with only the keys we change replaced
    overrides: dict[str, Any]  # top-level keys the gateway sets for every channel (max_tokens when absent)
    body_size: int  # bytes the client sent: big bodies are handled off the event loop
    model: str
    stream: bool
    client_wants_usage: bool
    token: TokenOut
    reservation: int | None = None  # the quota held for this request, released when it settles
    reserved: int | None = None  # how many tokens it holds
    limits: dict[str, str] = field(default_factory=dict)  # the admission's x-ratelimit-* headers, sent on the answer
    started_wall: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Split a byte stream into SSE events, each with its blank-line separator, bytes unchanged."""
    buf = b""
    async for chunk in chunks:
        buf += chunk
        while True:
            lf, crlf = buf.find(b"\n\n"), buf.find(b"\r\n\r\n")
            if lf < 0 and crlf < 0:
                break
            if crlf >= 0 and (lf < 0 or crlf < lf):
                end = crlf + 4
            else:
                end = lf + 2
            yield buf[:end]
            buf = buf[end:]
    if buf.strip():
        yield buf


def _count(value: Any) -> int:
    """A usage count as a backend reported it; nonsense counts as 0 rather than failing the settlement."""
    try:
        return max(int(value or 0), 0)
    except (TypeError, ValueError, OverflowError):
        return 0


def _data_json(event: bytes) -> Any:
    lines = [ln[5:].strip() for ln in event.splitlines() if ln.startswith(b"data:")]
    return json.loads(b"\n".join(lines)) if lines else None


class Relay(Response):
    """Tries the candidate channels in order, then streams or returns the chosen one's answer."""

    def __init__(
        self,
        call: ProxyCall,
        candidates: list[Channel],
        *,
        router: Router,
        reservations: Reservations,
        client: httpx.AsyncClient,
        settings: GatewaySettings,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.call = call
        self.metrics = metrics
        self.upstream_s = 0.0  # time spent waiting for backends before the answer started (every attempt)
        self.overhead_s: float | None = None  # the gateway's own time until the answer started
        self.extra_headers: list[tuple[bytes, bytes]] = []  # e.g. a busy backend's retry-after
        self._counted: Channel | None = None  # the channel this request counts on in the router's loads
        self.candidates = candidates
        self.router = router
        self.reservations = reservations
        self.client = client
        self.settings = settings
        self.status_code = 200
        self.background = None
        self.channel: Channel | None = None
        self.upstream: httpx.Response | None = None
        self.error: str | None = None
        self.usage: dict[str, Any] | None = None
        self.first_byte_ms: float | None = None
        self.chunks = 0
        self.done = False
        self.finished = False
        self.client_gone = False
        self.headers_sent = False
        self.complete = False
        self._meta: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        try:
            async with anyio.create_task_group() as tg:

                async def watch_client() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if not self.complete:  # uvicorn also reports a disconnect once the response is done
                        self.client_gone = True
                        tg.cancel_scope.cancel()

                tg.start_soon(watch_client)
                try:
                    await self._serve(send)
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._close_upstream()
                self._count_on(None)
                await self._settle()
            if self.metrics is not None:
                self.metrics.in_flight.dec()

    # -- trying channels --------------------------------------------------------------------
    async def _serve(self, send: Send) -> None:
        failures: list[str] = []
        busy: tuple[str | None, bytes] | None = None  # the last 429: its retry-after and body
        for channel in self.candidates:
            self._count_on(channel)
            self.channel = channel
            url = upstream_url(channel.base_url, self.call.path)
            content = await off_loop_if_large(self.call.body_size, self.call.source.with_changes, self._changes(channel))
            waited = time.perf_counter()
            try:
                resp = await self.client.send(
                    self.client.build_request("POST", url, content=content, headers=upstream_headers(channel)),
                    stream=True,
                )
            except httpx.HTTPError as exc:
                self.upstream_s += time.perf_counter() - waited
                await self._failed(channel, describe_failure(exc, url, self.settings), failures)
                continue
            self.upstream = resp
            if resp.status_code == 429:
                # busy (its own queue or rate limit), not broken: the next channel may take it, and the
                # channel is not counted towards auto-disable
                try:
                    busy = (resp.headers.get("retry-after"), await resp.aread())
                except httpx.HTTPError:  # the body is only passed on when every channel is busy
                    busy = (resp.headers.get("retry-after"), b"")
                await self._close_upstream()
                self.upstream_s += time.perf_counter() - waited
                failures.append(f"channel '{channel.name}': {url} answered HTTP 429 (busy)")
                continue
            if resp.status_code >= 500:
                text = await self._read_error(resp)
                self.upstream_s += time.perf_counter() - waited
                await self._failed(channel, f"{url} answered HTTP {resp.status_code}: {text}", failures)
                continue
            if resp.status_code != 200:
                # The backend refused the request itself (bad parameters, context too long):
                # another channel would refuse it too, so the client sees the backend's answer.
                content = await resp.aread()
                self.upstream_s += time.perf_counter() - waited
                self.error = f"backend answered HTTP {resp.status_code}: {content[:300].decode(errors='replace')}"
                await self._send_whole(send, resp.status_code, content, resp.headers.get("content-type"))
                return
            try:
                if self.call.stream:
                    events = sse_events(resp.aiter_bytes())
                    first = await events.__anext__()
                else:
                    content = await resp.aread()
            except (httpx.HTTPError, StopAsyncIteration) as exc:
                self.upstream_s += time.perf_counter() - waited
                reason = (
                    describe_failure(exc, url, self.settings)
                    if isinstance(exc, httpx.HTTPError)
                    else f"{url} closed the stream before sending anything"
                )
                await self._failed(channel, reason, failures)
                continue
            self.upstream_s += time.perf_counter() - waited
            self.first_byte_ms = (time.perf_counter() - self.call.started) * 1000
            await self.router.record_success(channel)
            if self.call.stream:
                await self._pump(send, first, events)
            else:
                self._usage_from_body(content)
                await self._send_whole(send, 200, content, resp.headers.get("content-type"))
            return
        n = len(failures)
        message = (
            f"All {n} channel{'s' if n > 1 else ''} for model '{self.call.model}' failed: " + "; ".join(failures)
        )
        self.error = message
        if busy is not None and all(f.endswith("answered HTTP 429 (busy)") for f in failures):
            # every channel is busy: the client gets the backends' 429 (and its retry-after), which heals
            self.extra_headers = [(b"retry-after", busy[0].encode("latin-1", "replace"))] if busy[0] else []
            body = busy[1] or json.dumps(error_body(message, "rate_limit_error", code="rate_limit_exceeded")).encode()
            await self._send_whole(send, 429, body)
            return
        await self._send_whole(send, 502, json.dumps(error_body(message, "upstream_error", code="upstream_failed")).encode())

    def _count_on(self, channel: Channel | None) -> None:
        """The request is now on ``channel`` (None: on none) for least-busy routing."""
        if self._counted is not None:
            self.router.finished(self._counted)
        self._counted = channel
        if channel is not None:
            self.router.started(channel)

    def _changes(self, channel: Channel) -> dict[str, Any]:
        """The top-level keys sent upstream instead of the client's."""
        changes = {**self.call.overrides, "model": channel.upstream_model(self.call.model)}
        if self.call.stream:
            # Ask for the usage chunk even if the client did not: it is what we charge.
            options = self.call.body.get("stream_options")
            changes["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return changes

    async def _read_error(self, resp: httpx.Response) -> str:
        try:
            raw = await resp.aread()
        except httpx.HTTPError:
            return "(body unreadable)"
        finally:
            await resp.aclose()
            self.upstream = None
        try:
            return str(json.loads(raw)["error"]["message"])[:300]
        except (ValueError, KeyError, TypeError):
            return raw[:300].decode(errors="replace")

    async def _failed(self, channel: Channel, reason: str, failures: list[str]) -> None:
        failures.append(f"channel '{channel.name}': {reason}")
        await self._close_upstream()
        await self.router.record_failure(channel, reason)

    # -- answering the client ---------------------------------------------------------------
    def _gateway_headers(self) -> list[tuple[bytes, bytes]]:
        """Which channel answered, and the gateway's own time so far without the backends' (LiteLLM's
        ``x-litellm-overhead-duration-ms``)."""
        self.overhead_s = max(time.perf_counter() - self.call.started - self.upstream_s, 0.0)
        headers = [(b"x-llama-lab-overhead-ms", f"{self.overhead_s * 1000:.2f}".encode()),
                   *((name.encode(), value.encode()) for name, value in self.call.limits.items())]
        if self.channel is not None:
            # percent-encoded: header values are Latin-1, a channel's name may be any text
            headers.append((b"x-llama-lab-channel", quote(self.channel.name, safe=_HEADER_SAFE).encode()))
        return headers

    async def _send_whole(self, send: Send, status: int, content: bytes, content_type: str | None = None) -> None:
        self.status_code = status
        headers = [(b"content-type", (content_type or "application/json").encode()), (b"content-length", str(len(content)).encode()),
                   *self._gateway_headers(), *self.extra_headers]
        self.headers_sent = True
        await send({"type": "http.response.start", "status": status, "headers": headers})
        self.complete = True
        await send({"type": "http.response.body", "body": content, "more_body": False})

    async def _pump(self, send: Send, first: bytes, events: AsyncIterator[bytes]) -> None:
        assert self.channel is not None
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            *self._gateway_headers(),
        ]
        self.headers_sent = True
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        try:
            self._remember_meta(first)
            event: bytes | None = first
            while event is not None:
                out = self._inspect(event)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if self.done:
                    break
                event = await anext(events, None)
            if not (self.done or self.finished):
                raise httpx.RemoteProtocolError("the stream ended without [DONE] or a finish_reason")
        except httpx.HTTPError as exc:
            reason = describe_failure(exc, self.channel.base_url, self.settings)
            self.error = f"channel '{self.channel.name}' failed mid-stream after {self.chunks} chunks: {reason}"
            self.status_code = 502
            await self.router.record_failure(self.channel, reason)
            await send({"type": "http.response.body", "body": self._error_tail(), "more_body": True})
        self.complete = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        if self.done:
            # Read the upstream to its end so its keep-alive connection goes back to the pool.
            with anyio.move_on_after(1.0):
                try:
                    while await anext(events, None) is not None:
                        pass
                except httpx.HTTPError:
                    pass

    def _remember_meta(self, event: bytes) -> None:
        try:
            obj = _data_json(event)
        except ValueError:
            return
        if isinstance(obj, dict):
            self._meta = {k: obj[k] for k in ("id", "created", "model", "object") if k in obj}

    def _inspect(self, event: bytes) -> bytes | None:
        """Read usage and end markers off an event; returns the bytes to forward (None = drop)."""
        if event.startswith(b"data: [DONE]") or event.startswith(b"data:[DONE]"):
            self.done = True
            return event
        self.chunks += 1
        if not self.finished and _FINISHED.search(event):
            self.finished = True
        if _HAS_USAGE.search(event):
            try:
                obj = _data_json(event)
            except ValueError:
                return event
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                self.usage = obj["usage"]
                self.chunks -= 1
                if not self.call.client_wants_usage and not obj.get("choices"):
                    return None  # the usage-only chunk we asked for, not the client
        return event

    def _error_tail(self) -> bytes:
        """Make a mid-stream failure visible: as text (NextChat drops error chunks), then as an error event."""
        text = f"\n\n[gateway error: {self.error}. The answer above is incomplete.]"
        meta = {"id": self._meta.get("id", "gateway-error"), "created": self._meta.get("created", int(time.time()))}
        meta["model"] = self._meta.get("model", self.call.model)
        if self.call.path == "/completions":
            chunk = {**meta, "object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": None}]}
        else:
            chunk = {
                **meta,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
            }
        err = error_body(self.error or "upstream failed", "upstream_error", code="upstream_failed_mid_stream")
        return b"data: " + json.dumps(chunk).encode() + b"\n\ndata: " + json.dumps(err).encode() + b"\n\n" + DONE

    def _usage_from_body(self, content: bytes) -> None:
        try:
            usage = json.loads(content).get("usage")
        except (ValueError, AttributeError):
            return
        if isinstance(usage, dict):
            self.usage = usage

    # -- after the answer -------------------------------------------------------------------
    async def _close_upstream(self) -> None:
        if self.upstream is not None:
            upstream, self.upstream = self.upstream, None
            await upstream.aclose()

    async def _settle(self) -> None:
        prompt = completion = 0
        if self.usage:
            prompt, completion = _count(self.usage.get("prompt_tokens")), _count(self.usage.get("completion_tokens"))
        elif self.chunks and self.channel is not None:
            # Cut before the backend's usage chunk (client stop, backend crash): charge what we saw,
            # never more than the request held (the role chunk is counted as a token here).
            prompt, completion = estimate_prompt_tokens(self.call.body), self.chunks
            if self.call.reserved is not None:
                prompt = min(prompt, self.call.reserved)
                completion = min(completion, self.call.reserved - prompt)
        if self.call.reserved is not None and prompt + completion > self.call.reserved:
            log.warning("token %s: the backend reported %d tokens, more than the %d reserved (the prompt estimate "
                        "was not an upper bound for this backend)", self.call.token.id, prompt + completion,
                        self.call.reserved)
        status = self.status_code
        if self.client_gone:
            status = 499
            self.error = self.error or f"client disconnected after {self.chunks} chunks; upstream request closed"
        if not self.headers_sent and not self.client_gone and self.error is None:
            status, self.error = 500, "the gateway failed before answering"
        entry = {
            "time": self.call.started_wall,
            "token_id": self.call.token.id,
            "token_name": self.call.token.name,
            "channel_id": self.channel.id if self.channel else None,
            "channel_name": self.channel.name if self.channel else None,
            "model": self.call.model,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "latency_ms": (time.perf_counter() - self.call.started) * 1000,
            "first_byte_ms": self.first_byte_ms,
            "status": status,
            "stream": self.call.stream,
            "error": self.error,
        }
        try:
            await self.reservations.settle(entry, self.call.reservation)
        except Exception:
            log.exception("could not record usage for token %s: %s", self.call.token.id, entry)
        if self.metrics is not None:
            self.metrics.observe(entry, self.overhead_s)
