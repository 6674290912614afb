"""The gateway's refusals: OpenAI-shaped errors that the openai SDK is told not to retry."""

from __future__ import annotations

from llama_lab.web.errors import APIError


class GatewayError(APIError):
    """An ``APIError`` that tells the openai SDK not to retry a refusal that will not heal in a second.

    The SDK retries 401/403/429 by default; an exhausted quota or a revoked token would only be
    hammered. A rate limit heals, so its 429 passes ``x-should-retry: true`` and ``retry-after``.
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        base = {"x-should-retry": "false"} if status in (401, 403, 429) else {}
        super().__init__(status, message, type=type, code=code, headers={**base, **(headers or {})} or None)
