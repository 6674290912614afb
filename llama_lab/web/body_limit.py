"""A request body size limit, enforced before any route parses the body (both apps use it).

Without one, a 10 MB chat message is read, parsed and tokenized in full before it is refused.
A declared ``Content-Length`` over the limit is refused without reading a byte; a chunked body
is read only until it passes the limit. Pure ASGI: ``BaseHTTPMiddleware`` would hide client
disconnects from streaming responses.
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llama_lab.web.errors import error_body

logger = logging.getLogger(__name__)

_NO_BODY = {"GET", "HEAD", "OPTIONS"}


class BodyLimit:
    """Answer 413 (OpenAI-shaped) to any request body larger than ``max_bytes``.

    The body is read here (at most ``max_bytes``) and replayed to the app as one message; later
    ``receive()`` calls go to the server, so routes still see ``http.disconnect``. A client that
    leaves mid-upload is passed on to the app as that disconnect, so the app sees the request end
    (the gateway logs it) instead of it vanishing unseen. ``who`` and ``remedy`` word the refusal
    for the app's users ("this gateway", "ask the gateway admin to raise ...").
    """

    def __init__(self, app: ASGIApp, max_bytes: int, who: str = "this server",
                 remedy: str = "raise the limit with --max-body-bytes") -> None:
        self.app, self.max_bytes, self.who, self.remedy = app, max_bytes, who, remedy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _NO_BODY:
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
        logger.warning("refused a %s body on %s %s from %s (limit %d bytes)", size, scope.get("method"),
                       scope.get("path"), client[0], self.max_bytes)
        message = (f"The request body is too large: {size}, and {self.who} accepts at most {self.max_bytes} bytes "
                   f"({self.max_bytes / 2**20:.3g} MiB). Send a shorter request, or {self.remedy}.")
        payload = json.dumps(error_body(message, "invalid_request_error", code="request_too_large")).encode()
        # No "connection: close": the server discards the rest of the upload and the client can
        # read this answer once it has sent its body, instead of failing on a reset socket.
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload, "more_body": False})


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers") or []:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server rejects a malformed length before we run
    return None


def _replay(first: Message, receive: Receive) -> Receive:
    """A ``receive`` that answers ``first`` once, then the real one (which reports the disconnect)."""
    pending: list[Message] = [first]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay
