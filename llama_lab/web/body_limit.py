"""A request body size limit, enforced before any route parses the body.

Without one, a 10 MB chat message is read, parsed and tokenized in full before it is refused.
A declared ``Content-Length`` over the limit is refused without reading a byte; a chunked body
is read only until it passes the limit. Pure ASGI: ``BaseHTTPMiddleware`` would hide client
disconnects from streaming responses.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from llama_lab.web.errors import error_body

logger = logging.getLogger(__name__)

_NO_BODY = {"GET", "HEAD", "OPTIONS"}


class BodyLimit:
    """Answer 413 (OpenAI-shaped) to any request body larger than ``max_bytes``.

    The body is read here (at most ``max_bytes``) and replayed to the app as one message; later
    ``receive()`` calls go to the server, so routes still see ``http.disconnect``.
    """

    def __init__(self, app: Any, max_bytes: int, setting: str = "--max-body-bytes") -> None:
        self.app, self.max_bytes, self.setting = app, max_bytes, setting

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in _NO_BODY:
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await self._refuse(send, declared)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left mid-upload: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(send, None)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any, declared: int | None) -> None:
        size = f"is {declared} bytes," if declared is not None else "is"
        message = (f"The request body {size} over this server's limit of {self.max_bytes} bytes "
                   f"({self.max_bytes / 2**20:.1f} MiB). Send a shorter request, or raise the limit with {self.setting}.")
        logger.warning("refused a request body over the %d-byte limit (declared length: %s)", self.max_bytes, declared)
        payload = json.dumps(error_body(message, code="request_too_large")).encode()
        # No "connection: close": the server discards the rest of the upload and the client can
        # read this answer once it has sent its body, instead of failing on a reset socket.
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def _content_length(scope: Any) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server rejects a malformed length before we run
    return None
