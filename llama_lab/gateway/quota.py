"""What a request may cost at most, and holding that much of a token's quota until it settles.

The gateway has no tokenizer of its own. It first bounds the prompt from its bytes (free: no round
trip); only when that bound does not fit the token's free quota does it ask the channel's
``POST /tokenize`` (llama_lab's server and vLLM offer it) for the exact count and try again
(``PromptCounter``). So a small quota serves a short request, and the common case costs nothing.

The byte bound: a byte-level BPE tokenizer
(Llama 3, SmolLM2, Qwen, GPT) emits at least one byte of text per token, and a SentencePiece
tokenizer with byte fallback at most one token per byte (plus a word-start marker per segment,
covered by the JSON overhead below). So the UTF-8 bytes of the JSON-encoded messages bound the
tokens of their text; the JSON quotes and keys (about 25 bytes a message) cover the tokens a chat
template adds around each message, and ``TEMPLATE_OVERHEAD_TOKENS`` covers the template's fixed parts
(a default system prompt, the assistant header).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import httpx

from llama_lab.gateway.routing import upstream_headers
from llama_lab.gateway.schemas import Channel
from llama_lab.gateway.store import Admission, Store
from llama_lab.web.errors import APIError

log = logging.getLogger(__name__)

# A chat template's fixed tokens: SmolLM2's default system prompt and headers are about 30,
# Llama 3.1's date preamble about as many; 64 leaves room.
TEMPLATE_OVERHEAD_TOKENS = 64

# A backend that renders tools with a generic prompt (llama_lab's, for templates without tool support)
# adds fixed instructions around the tools' JSON: 105 tokens for SmolLM2; 128 leaves room.
TOOL_PROMPT_OVERHEAD_TOKENS = 128

_PROMPT_FIELDS = ("messages", "prompt", "suffix", "tools", "functions", "tool_choice", "response_format")


def prompt_upper_bound(body: dict[str, Any]) -> int:
    """Tokens the prompt cannot exceed: UTF-8 bytes of what a template can render, plus its fixed parts."""
    size = 0
    for field in _PROMPT_FIELDS:
        value = body.get(field)
        if value is not None:
            size += len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    tools = TOOL_PROMPT_OVERHEAD_TOKENS if body.get("tools") or body.get("functions") else 0
    return size + TEMPLATE_OVERHEAD_TOKENS + tools


def _count(body: dict[str, Any], field: str) -> int | None:
    """An integer request field as a backend would read it (``8``, ``8.0``, ``"8"``), or None when absent."""
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool):
        value = None
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int):
        raise APIError(400, f"invalid value for '{field}': expected an integer, got {body.get(field)!r}",
                       param=field, code="invalid_value")
    return value


def completion_cap(body: dict[str, Any]) -> int | None:
    """The completion tokens the client asked for (``max_completion_tokens`` wins), or None if it gave none."""
    cap = _count(body, "max_completion_tokens")
    return cap if cap is not None else _count(body, "max_tokens")


def choices(body: dict[str, Any]) -> int:
    """How many completions the backend generates: ``n`` (or ``best_of``) per prompt."""
    per_prompt = max(_count(body, "n") or 1, _count(body, "best_of") or 1, 1)
    prompt = body.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    return per_prompt * prompts


# The most a request counts: a client's max_tokens of 10**20 must not overflow the 64-bit sums of the
# admitting UPDATE; 2**53 tokens is beyond any quota or limit that means something.
MAX_COUNTED_TOKENS = 2**53


def worst_case(body: dict[str, Any], max_tokens: int, prompt_tokens: int | None = None) -> int:
    """The most a request can be charged: its prompt (``prompt_tokens`` when counted exactly, else the
    bound from its bytes) plus ``max_tokens`` for every choice."""
    prompt = prompt_upper_bound(body) if prompt_tokens is None else prompt_tokens
    return min(prompt + max(max_tokens, 0) * choices(body), MAX_COUNTED_TOKENS)


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A realistic count (4 characters a token) for streams cut before the backend sent its usage."""
    chars = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        chars += len(prompt)
    messages = body.get("messages")
    return math.ceil(chars / 4) + 4 * (len(messages) if isinstance(messages, list) else 0)


# What a backend's /tokenize needs to render a request's prompt as generation would.
_TOKENIZE_FIELDS = ("messages", "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls")


def tokenize_body(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """The ``/tokenize`` request for one OpenAI request, or None when it has no single prompt to count."""
    if path == "/chat/completions" and isinstance(body.get("messages"), list):
        return {k: body[k] for k in _TOKENIZE_FIELDS if body.get(k) is not None}
    prompt = body.get("prompt")
    if path == "/completions" and (isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                                               and all(isinstance(t, int) for t in prompt))):
        return {"prompt": prompt}
    return None


def tokenize_url(base_url: str) -> str:
    """``/tokenize`` sits at the server's root (vLLM, llama_lab), beside ``/v1``."""
    base = base_url.rstrip("/")
    return (base[:-3] if base.endswith("/v1") else base) + "/tokenize"


class PromptCounter:
    """Exact prompt counts from a channel's own tokenizer, for quotas the byte bound would refuse.

    A channel that answers ``/tokenize`` with something other than a count (a 404 from a server without
    the route, llama.cpp's different body) is not asked again for ``retry_s`` seconds; a channel that
    cannot be reached, or is slower than ``timeout_s``, just leaves the byte bound in place.
    """

    def __init__(self, client: httpx.AsyncClient, timeout_s: float = 5.0, retry_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client, self.timeout_s, self.retry_s, self.clock = client, timeout_s, retry_s, clock
        self._unsupported: dict[int, float] = {}  # channel id -> when it may be asked again

    async def count(self, channel: Channel, path: str, body: dict[str, Any]) -> int | None:
        request = tokenize_body(path, body)
        if request is None or self._unsupported.get(channel.id, 0.0) > self.clock():
            return None
        try:
            reply = await self.client.post(tokenize_url(channel.base_url), json=request,
                                           headers=upstream_headers(channel), timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            log.info("channel %r: no prompt count (%s); using the byte bound", channel.name, exc)
            return None
        try:
            count = reply.json().get("count") if reply.status_code == 200 else None
        except ValueError:
            count = None
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            if reply.status_code < 500:
                self._unsupported[channel.id] = self.clock() + self.retry_s
            log.info("channel %r answered /tokenize with %s, not a count; using the byte bound", channel.name,
                     reply.status_code)
            return None
        return count


class Reservations:
    """This process's reservations: taken before a request is forwarded, released when it settles.

    While a request runs, its reservation is renewed every ``ttl / 3`` seconds; one whose gateway
    died stops being renewed and any gateway sharing the database releases it ``ttl`` seconds later.
    """

    def __init__(self, store: Store, ttl: float) -> None:
        self.store = store
        self.ttl = ttl
        self.live: set[int] = set()

    async def take(self, token_id: int, amount: int, model: str | None = None) -> Admission:
        """Admit one request (``Store.admit``): its quota, a place in flight, its minute's counts."""
        admission = await self.store.run(self.store.admit, token_id, amount, self.ttl, model=model)
        if admission.reservation is not None:
            self.live.add(admission.reservation)
        return admission

    async def settle(self, entry: dict[str, Any], rid: int | None) -> None:
        """Charge the real usage, release the reservation and log the request (one transaction)."""
        try:
            await self.store.run(self.store.settle, entry, rid)
        finally:
            self.live.discard(rid)  # type: ignore[arg-type]

    async def tick(self) -> None:
        await self.store.run(self.store.renew, sorted(self.live), self.ttl)
        released = await self.store.run(self.store.expire_reservations)
        if released:
            log.warning("released %d expired quota reservation(s) left by a gateway that stopped", released)

    async def keep_alive_forever(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # renewal must outlive a DB hiccup
                log.exception("could not renew quota reservations")
            await asyncio.sleep(self.ttl / 3)
