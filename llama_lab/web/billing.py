"""NextChat's usage panel in One API's units, for any app that counts tokens.

NextChat reads ``hard_limit_usd`` from ``GET /dashboard/billing/subscription`` and
``total_usage`` (cents) from ``GET /dashboard/billing/usage``, both without the ``/v1`` prefix.
Tokens become dollars at One API's rate, 500,000 tokens = 1 USD, as the gateway reports them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter

TOKENS_PER_USD = 500_000
UNLIMITED_USD = 100_000_000.0  # what One API reports for no limit; NextChat shows it as is
BILLING_PREFIXES = ("", "/v1")  # NextChat's base URL may be given with or without /v1


def add_billing_routes(router: APIRouter, subscription_route: Callable[..., Any], usage_route: Callable[..., Any],
                       dependencies: Sequence[Any] = ()) -> None:
    """Serve the two endpoints at every path NextChat may call, each app answering from its own counts."""
    for prefix in BILLING_PREFIXES:
        router.add_api_route(f"{prefix}/dashboard/billing/subscription", subscription_route, methods=["GET"],
                             dependencies=list(dependencies))
        router.add_api_route(f"{prefix}/dashboard/billing/usage", usage_route, methods=["GET"],
                             dependencies=list(dependencies))


def subscription(limit_tokens: int | None, tokens_per_usd: int = TOKENS_PER_USD, access_until: int = 0) -> dict[str, Any]:
    """The subscription object; ``limit_tokens=None`` means no limit."""
    limit = UNLIMITED_USD if limit_tokens is None else round(limit_tokens / tokens_per_usd, 6)
    return {"object": "billing_subscription", "has_payment_method": True, "soft_limit_usd": limit,
            "hard_limit_usd": limit, "system_hard_limit_usd": limit, "access_until": access_until}


def usage(used_tokens: int, tokens_per_usd: int = TOKENS_PER_USD) -> dict[str, Any]:
    """The usage object: ``total_usage`` in cents, as OpenAI's old billing API gave it."""
    return {"object": "list", "total_usage": round(used_tokens / tokens_per_usd * 100, 4)}
