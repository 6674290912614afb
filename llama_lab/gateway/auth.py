"""Who is calling: the API token of an OpenAI request, or the admin key of an ``/api`` request.

Each refusal says why and what to do (401 for a key that is missing, unknown, disabled or expired;
403 for a token used from an address or on a model it may not use).
"""

from __future__ import annotations

import ipaddress
import time
from datetime import datetime, timezone

from fastapi import Request

from llama_lab.gateway.errors import GatewayError
from llama_lab.gateway.schemas import TokenOut
from llama_lab.gateway.store import KEY_PREFIX
from llama_lab.web.auth import bearer_token, same_key


def invalid_token(reason: str) -> GatewayError:
    return GatewayError(401, reason, "invalid_request_error", "invalid_api_key")


def _hint(key: str) -> str:
    """Enough of a key to recognize it in a message, not enough to use it."""
    return f"{key[:7]}...{key[-4:]}" if len(key) > 14 else "(a short key)"


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


async def current_token(request: Request) -> TokenOut:
    """The calling token, refused with a message that says why (401 / 403)."""
    store = request.app.state.store
    key = bearer_token(request.headers)
    if key is None:
        raise invalid_token(
            "Missing API key: send 'Authorization: Bearer sk-...' with a token from this gateway "
            "(create one with `llama-lab gateway token add`)."
        )
    token = await store.run(store.token_by_key, key) if key.startswith(KEY_PREFIX) else None
    if token is None:
        raise invalid_token(f"Invalid token {_hint(key)}: this gateway has no such token; check the API key in your client.")
    if not token.enabled:
        raise invalid_token(f"Token '{token.name}' is disabled; ask the gateway admin to enable it.")
    if token.expires_at is not None and token.expires_at <= time.time():
        raise GatewayError(
            401, f"Token '{token.name}' expired at {_utc(token.expires_at)}; ask the gateway admin to extend it.",
            "invalid_request_error", "token_expired",
        )
    if token.subnets:
        host = request.client.host if request.client else ""
        try:
            addr = ipaddress.ip_address(host)
            allowed = any(addr in ipaddress.ip_network(net, strict=False) for net in token.subnets)
        except ValueError:
            allowed = False
        if not allowed:
            raise GatewayError(
                403, f"Token '{token.name}' may not be used from {host or 'this address'} (allowed: {', '.join(token.subnets)}).",
                "invalid_request_error", "address_not_allowed",
            )
    return token


def check_model(token: TokenOut, model: str) -> None:
    """Refuse (403) a model outside the token's list; an empty list allows every model."""
    if token.models and model not in token.models:
        raise GatewayError(
            403, f"Token '{token.name}' may not use model '{model}' (allowed: {', '.join(token.models)}).",
            "invalid_request_error", "model_not_allowed",
        )


async def require_admin(request: Request) -> None:
    """The admin key, as a Bearer token or an ``x-admin-key`` header (curl users reach for either)."""
    given = bearer_token(request.headers) or request.headers.get("x-admin-key")
    if not given or not same_key(given, request.app.state.admin_key):
        raise GatewayError(
            401, "Invalid admin key: send 'Authorization: Bearer <admin key>' (the key given with --admin-key "
            "or LLAMA_LAB_ADMIN_KEY when the gateway started).", "invalid_request_error", "invalid_admin_key",
        )
