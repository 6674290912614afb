"""API keys as both apps read them: ``Authorization: Bearer <key>``, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Mapping


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (any case of "Bearer"), or None."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def same_key(given: str, expected: str) -> bool:
    """Constant-time: how long a wrong key took to refuse tells an attacker nothing about the right one."""
    return hmac.compare_digest(given.encode(), expected.encode())
