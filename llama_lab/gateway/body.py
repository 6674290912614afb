"""Request bodies that cannot freeze the gateway: a size limit enforced while reading, big JSON off the loop."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, TypeVar

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llama_lab.web.errors import error_body

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Below this, parsing on the event loop is quicker than a thread hop (a few hundred microseconds).
OFF_LOOP_BYTES = 256 * 1024


async def off_loop_if_large(size: int, fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn`` on a worker thread when it works on ``size`` bytes or more (JSON of a big body).

    The C JSON parser holds the GIL for its whole call, so a thread does not make a 4 MB parse
    free, but the event loop gets the GIL back between the calls instead of waiting for the
    whole request's parse, estimate and re-serialization in one go.
    """
    if size < OFF_LOOP_BYTES:
        return fn(*args)
    return await anyio.to_thread.run_sync(partial(fn, *args))


def dump_json(value: Any) -> str:
    """Compact JSON, as httpx would send it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


_WS = re.compile(r"[ \t\n\r]*")
_SCAN = json.JSONDecoder().scan_once  # the C scanner json.loads uses, one value at a time


@dataclass
class JsonObject:
    """A client's JSON object, parsed, with the text of each top-level value kept.

    The body sent upstream is the client's text with a few top-level keys replaced (``with_changes``),
    so a 4 MB conversation is parsed once and never encoded again: encoding it back would hold the
    GIL as long as parsing it did.
    """

    values: dict[str, Any]
    text: str = ""
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    def with_changes(self, changes: dict[str, Any]) -> bytes:
        if not self.spans:  # parsed the slow way (see parse_object): encode it all
            return dump_json({**self.values, **changes}).encode()
        parts = [f"{dump_json(k)}:{self.text[a:b]}" for k, (a, b) in self.spans.items() if k not in changes]
        parts += [f"{dump_json(k)}:{dump_json(v)}" for k, v in changes.items()]
        return ("{" + ",".join(parts) + "}").encode()


def parse_object(raw: bytes) -> JsonObject:
    """Parse a JSON object body (ValueError with json's own message when it is not valid JSON)."""
    text = raw.decode(json.detect_encoding(raw))
    try:
        return _scan_object(text)
    except (ValueError, StopIteration, IndexError):
        return JsonObject(json.loads(text))  # json's error message, or an odd-but-valid body (no spans)


def _scan_object(text: str) -> JsonObject:
    idx = _WS.match(text, 0).end()
    if text[idx] != "{":
        raise ValueError("not an object")
    obj = JsonObject({}, text)
    idx = _WS.match(text, idx + 1).end()
    if text[idx] == "}":
        return _end(obj, text, idx)
    while True:
        if text[idx] != '"':
            raise ValueError("expecting a key")
        key, idx = json.decoder.scanstring(text, idx + 1)
        idx = _WS.match(text, idx).end()
        if text[idx] != ":":
            raise ValueError("expecting ':'")
        start = _WS.match(text, idx + 1).end()
        value, end = _SCAN(text, start)
        obj.values[key] = value
        obj.spans[key] = (start, end)  # a repeated key: the last one wins, as in json.loads
        idx = _WS.match(text, end).end()
        if text[idx] == "}":
            return _end(obj, text, idx)
        if text[idx] != ",":
            raise ValueError("expecting ',' or '}'")
        idx = _WS.match(text, idx + 1).end()


def _end(obj: JsonObject, text: str, idx: int) -> JsonObject:
    if _WS.match(text, idx + 1).end() != len(text):
        raise ValueError("extra data")
    return obj


class BodyLimit:
    """ASGI middleware: refuse a body over ``max_bytes`` with 413, having held at most that much of it.

    A declared ``Content-Length`` over the limit is refused before a byte is read; a chunked body is
    counted as it arrives. The server discards the rest of a refused body without buffering it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, send, f"{declared} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending: let the app see it
                await self.app(scope, _replay(message, receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, send, f"more than {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay(body, receive), send)

    async def _refuse(self, scope: Scope, send: Send, size: str) -> None:
        client = scope.get("client") or ("?", 0)
        log.warning("refused a %s body on %s %s from %s", size, scope.get("method"), scope.get("path"), client[0])
        mib = self.max_bytes / 2**20
        message = (
            f"The request body is too large: {size}, and this gateway accepts at most {self.max_bytes} bytes "
            f"({mib:.3g} MiB). Send a shorter conversation, or ask the gateway admin to raise --max-body-bytes."
        )
        content = json.dumps(error_body(message, "invalid_request_error", code="request_too_large")).encode()
        await send({
            "type": "http.response.start", "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())],
        })
        await send({"type": "http.response.body", "body": content, "more_body": False})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or []:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(first: Message, receive: Receive) -> Receive:
    """A ``receive`` that answers ``first`` once, then the real one (which reports the disconnect)."""
    pending: list[Message] = [first]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay
