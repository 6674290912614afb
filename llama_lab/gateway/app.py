"""The gateway's HTTP app: OpenAI routes, NextChat's billing routes, and the admin API under /api."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from datetime import datetime, timezone
from typing import Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from llama_lab.gateway.proxy import ProxyCall, Relay
from llama_lab.gateway.routing import Router, test_channel
from llama_lab.gateway.schemas import (
    ChannelIn,
    ChannelOut,
    ChannelPatch,
    ChannelTestResult,
    LogOut,
    TokenCreated,
    TokenIn,
    TokenOut,
    TokenPatch,
)
from llama_lab.gateway.settings import GatewaySettings
from llama_lab.gateway.store import KEY_PREFIX, Store
from llama_lab.web.cors import install_cors
from llama_lab.web.errors import APIError, install_error_handlers
from llama_lab.web.pages import add_page, add_redirect

log = logging.getLogger(__name__)

UNLIMITED_USD = 100_000_000.0  # what One API reports for an unlimited token; NextChat shows it as is


class GatewayError(APIError):
    """An ``APIError`` that tells the openai SDK not to retry a refusal that will not heal in a second.

    The SDK retries 401/403/429 by default; an exhausted quota or a revoked token would only be
    hammered.
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None) -> None:
        headers = {"x-should-retry": "false"} if status in (401, 403, 429) else None
        super().__init__(status, message, type=type, code=code, headers=headers)


def invalid_token(reason: str) -> GatewayError:
    return GatewayError(401, reason, "invalid_request_error", "invalid_api_key")


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def _hint(key: str) -> str:
    return f"{key[:7]}...{key[-4:]}" if len(key) > 14 else "(a short key)"


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _state(request: Request) -> Any:
    return request.app.state


async def current_token(request: Request) -> TokenOut:
    """The calling token, refused with a message that says why (401 / 403)."""
    state = _state(request)
    key = _bearer(request)
    if key is None:
        raise invalid_token(
            "Missing API key: send 'Authorization: Bearer sk-...' with a token from this gateway "
            "(create one with `llama-lab gateway token add`)."
        )
    token = await state.store.run(state.store.token_by_key, key) if key.startswith(KEY_PREFIX) else None
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
    if token.models and model not in token.models:
        raise GatewayError(
            403, f"Token '{token.name}' may not use model '{model}' (allowed: {', '.join(token.models)}).",
            "invalid_request_error", "model_not_allowed",
        )


def check_quota(token: TokenOut) -> None:
    if token.quota is not None and token.used >= token.quota:
        raise GatewayError(
            429,
            f"Token '{token.name}' has exhausted its quota: {token.used} of {token.quota} tokens used. "
            "Ask the gateway admin to raise the quota.",
            "insufficient_quota", "insufficient_quota",
        )


async def require_admin(request: Request) -> None:
    given = _bearer(request) or request.headers.get("x-admin-key")
    if not given or not secrets.compare_digest(given.encode(), _state(request).admin_key.encode()):
        raise GatewayError(
            401, "Invalid admin key: send 'Authorization: Bearer <admin key>' (the key given with --admin-key "
            "or LLAMA_LAB_ADMIN_KEY when the gateway started).", "invalid_request_error", "invalid_admin_key",
        )


def _not_found(kind: str, item_id: int) -> GatewayError:
    return GatewayError(404, f"No {kind} with id {item_id}.", "invalid_request_error", "not_found")


async def _proxy(request: Request, path: str) -> Any:
    state = _state(request)
    token: TokenOut | None = None
    model: str | None = None
    started = time.time()
    try:
        token = await current_token(request)
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise GatewayError(400, f"The request body is not valid JSON: {exc}.") from exc
        if not isinstance(body, dict):
            raise GatewayError(400, "The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "You must provide a model parameter (a model name, as listed by GET /v1/models).")
        check_model(token, model)
        check_quota(token)
        candidates = await state.router.candidates(model)
        if not candidates:
            raise GatewayError(503, await state.router.unavailable_message(model), "server_error", "model_not_available")
    except GatewayError as exc:
        await state.store.run(
            state.store.settle,
            {
                "time": started, "token_id": token.id if token else None, "token_name": token.name if token else None,
                "channel_id": None, "channel_name": None, "model": model if isinstance(model, str) else None,
                "prompt_tokens": 0, "completion_tokens": 0, "latency_ms": (time.time() - started) * 1000,
                "first_byte_ms": None, "status": exc.status, "stream": False, "error": exc.message,
            },
        )
        raise
    stream = bool(body.get("stream"))
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    call = ProxyCall(
        path=path, body=body, model=model, stream=stream,
        client_wants_usage=bool(options.get("include_usage")), token=token,
    )
    return Relay(call, candidates, router=state.router, store=state.store, client=state.client, settings=state.settings)


def openai_routes() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _proxy(request, "/chat/completions")

    @router.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _proxy(request, "/completions")

    @router.get("/v1/models")
    async def models(request: Request, token: TokenOut = Depends(current_token)) -> dict:
        names = await _state(request).router.models()
        if token.models:
            names = [m for m in names if m in token.models]
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "llama-lab-gateway"} for m in names]}

    async def subscription(request: Request, token: TokenOut = Depends(current_token)) -> dict:
        per_usd = _state(request).settings.tokens_per_usd
        limit = UNLIMITED_USD if token.quota is None else round(token.quota / per_usd, 6)
        return {
            "object": "billing_subscription",
            "has_payment_method": True,
            "soft_limit_usd": limit,
            "hard_limit_usd": limit,
            "system_hard_limit_usd": limit,
            "access_until": int(token.expires_at or 0),
        }

    async def usage(request: Request, token: TokenOut = Depends(current_token)) -> dict:
        cents = token.used / _state(request).settings.tokens_per_usd * 100
        return {"object": "list", "total_usage": round(cents, 4)}

    for prefix in ("", "/v1"):
        router.add_api_route(f"{prefix}/dashboard/billing/subscription", subscription, methods=["GET"])
        router.add_api_route(f"{prefix}/dashboard/billing/usage", usage, methods=["GET"])
    return router


def admin_routes() -> APIRouter:
    api = APIRouter(prefix="/api", dependencies=[Depends(require_admin)])

    @api.post("/channels", status_code=201)
    async def add_channel(data: ChannelIn, request: Request) -> ChannelOut:
        state = _state(request)
        out = await state.store.run(state.store.create_channel, data)
        state.router.invalidate()
        return out

    @api.get("/channels")
    async def list_channels(request: Request) -> list[ChannelOut]:
        return await _state(request).store.run(_state(request).store.list_channels)

    @api.get("/channels/{channel_id}")
    async def get_channel(channel_id: int, request: Request) -> ChannelOut:
        channel = await _state(request).store.run(_state(request).store.get_channel, channel_id)
        if channel is None:
            raise _not_found("channel", channel_id)
        return ChannelOut.model_validate(channel.model_dump())

    @api.patch("/channels/{channel_id}")
    async def update_channel(channel_id: int, patch: ChannelPatch, request: Request) -> ChannelOut:
        state = _state(request)
        out = await state.store.run(state.store.update_channel, channel_id, patch)
        if out is None:
            raise _not_found("channel", channel_id)
        state.router.invalidate()
        return out

    @api.delete("/channels/{channel_id}")
    async def delete_channel(channel_id: int, request: Request) -> dict:
        state = _state(request)
        if not await state.store.run(state.store.delete_channel, channel_id):
            raise _not_found("channel", channel_id)
        state.router.invalidate()
        return {"id": channel_id, "deleted": True}

    @api.post("/channels/{channel_id}/test")
    async def test(channel_id: int, request: Request) -> ChannelTestResult:
        state = _state(request)
        channel = await state.store.run(state.store.get_channel, channel_id)
        if channel is None:
            raise _not_found("channel", channel_id)
        result = await test_channel(state.client, channel, state.settings)
        await state.store.run(state.store.record_test, channel_id, result.latency_ms if result.ok else None)
        if result.ok and channel.auto_disabled:
            await state.store.run(state.store.set_auto_disabled, channel_id, False)
            state.router.invalidate()
        return result

    @api.post("/tokens", status_code=201)
    async def add_token(data: TokenIn, request: Request) -> TokenCreated:
        return await _state(request).store.run(_state(request).store.create_token, data)

    @api.get("/tokens")
    async def list_tokens(request: Request) -> list[TokenOut]:
        return await _state(request).store.run(_state(request).store.list_tokens)

    @api.get("/tokens/{token_id}")
    async def get_token(token_id: int, request: Request) -> TokenOut:
        token = await _state(request).store.run(_state(request).store.get_token, token_id)
        if token is None:
            raise _not_found("token", token_id)
        return token

    @api.patch("/tokens/{token_id}")
    async def update_token(token_id: int, patch: TokenPatch, request: Request) -> TokenOut:
        out = await _state(request).store.run(_state(request).store.update_token, token_id, patch)
        if out is None:
            raise _not_found("token", token_id)
        return out

    @api.delete("/tokens/{token_id}")
    async def delete_token(token_id: int, request: Request) -> dict:
        if not await _state(request).store.run(_state(request).store.delete_token, token_id):
            raise _not_found("token", token_id)
        return {"id": token_id, "deleted": True}

    @api.get("/logs")
    async def logs(
        request: Request,
        token_id: int | None = None,
        channel_id: int | None = None,
        model: str | None = None,
        status: int | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[LogOut]:
        store = _state(request).store
        return await store.run(
            store.logs, token_id=token_id, channel_id=channel_id, model=model, status=status,
            since=since, until=until, limit=min(max(limit, 1), 10_000), offset=max(offset, 0),
        )

    return api


def create_gateway_app(settings: GatewaySettings | None = None, store: Store | None = None) -> FastAPI:
    """Build a gateway app; ``store`` may be shared by tests, otherwise one is opened on ``settings.db``."""
    settings = settings or GatewaySettings()
    own_store = store is None
    store = store or Store(settings.db)
    admin_key = settings.admin_key
    if not admin_key:
        admin_key = "admin-" + secrets.token_urlsafe(18)
        log.warning("no admin key given: generated %s (set LLAMA_LAB_ADMIN_KEY or --admin-key to choose one)", admin_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.client = httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=settings.connect_timeout, read=settings.first_byte_timeout, write=30.0, pool=settings.connect_timeout
            ),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=30.0),
        )
        probe = asyncio.create_task(app.state.router.probe_forever(app.state.client), name="gateway-health-probe")
        try:
            yield
        finally:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
            await app.state.client.aclose()
            if own_store:
                store.close()

    app = FastAPI(title="llama-lab gateway", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    app.state.store = store
    app.state.admin_key = admin_key
    app.state.router = Router(store, settings)
    install_error_handlers(app)
    install_cors(app, settings.cors_origins, methods=["*"])

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app.include_router(openai_routes())
    app.include_router(admin_routes())
    add_page(app, "/admin", Path(__file__).parent / "static", index="admin.html")  # the admin console
    add_redirect(app, "/", "/admin")
    return app
