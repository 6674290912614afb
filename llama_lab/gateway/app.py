"""The gateway's HTTP app: OpenAI routes, NextChat's billing routes, and the admin API under /api.

No ``from __future__ import annotations`` here: the admin routes are built per collection and
FastAPI reads their body and response models from annotations evaluated when they are defined.
"""

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import time
from collections.abc import AsyncIterator
import pathlib
from datetime import datetime, timezone
from typing import Annotated, Any, Callable, Optional

import httpx
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse

from llama_lab.gateway.body import BodyLimit, JsonObject, off_loop_if_large, parse_object
from llama_lab.gateway.proxy import ProxyCall, Relay
from llama_lab.gateway.quota import Reservations, completion_cap, worst_case
from llama_lab.gateway.routing import Router, test_channel
from llama_lab.gateway.schemas import (
    CHANNELS,
    TOKENS,
    ChannelTestResult,
    LogFilter,
    LogOut,
    Resource,
    TokenOut,
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


async def _reserve(request: Request, token: TokenOut, need: int) -> Optional[int]:
    """Hold ``need`` tokens of the token's quota, or refuse with 429 saying how much is left."""
    state = _state(request)
    rid = await state.reservations.take(token.id, need)
    if rid is not None:
        return rid
    used, reserved, quota = await state.store.run(state.store.quota_state, token.id)
    if quota is None:  # made unlimited since we read it
        return None
    if used >= quota:
        message = (f"Token '{token.name}' has exhausted its quota: {used} of {quota} tokens used. "
                   "Ask the gateway admin to raise the quota.")
    else:
        free = max(quota - used - reserved, 0)
        message = (
            f"Token '{token.name}' has not enough quota left for this request: it may cost up to {need} tokens "
            f"(the prompt's upper bound plus max_tokens), and {free} of its {quota}-token quota are free "
            f"({used} used, {reserved} held by requests in flight). Lower max_tokens, or ask the gateway admin "
            "to raise the quota."
        )
    raise GatewayError(429, message, "insufficient_quota", "insufficient_quota")


async def require_admin(request: Request) -> None:
    given = _bearer(request) or request.headers.get("x-admin-key")
    if not given or not secrets.compare_digest(given.encode(), _state(request).admin_key.encode()):
        raise GatewayError(
            401, "Invalid admin key: send 'Authorization: Bearer <admin key>' (the key given with --admin-key "
            "or LLAMA_LAB_ADMIN_KEY when the gateway started).", "invalid_request_error", "invalid_admin_key",
        )


def _not_found(kind: str, item_id: int) -> GatewayError:
    return GatewayError(404, f"No {kind} with id {item_id}.", "invalid_request_error", "not_found")


def _storable_id(item_id: int) -> bool:
    """Ids are 32-bit in the database: a bigger one names nothing (and the driver would raise, not answer)."""
    return -(2**31) <= item_id < 2**31


def _parse_request(raw: bytes) -> JsonObject:
    try:
        body = parse_object(raw)
    except ValueError as exc:
        raise GatewayError(400, f"The request body is not valid JSON: {exc}.") from exc
    if not isinstance(body.values, dict):
        raise GatewayError(400, "The request body must be a JSON object.")
    return body


async def _proxy(request: Request, path: str) -> Any:
    state = _state(request)
    token: Optional[TokenOut] = None
    model: Any = None
    rid: Optional[int] = None
    need: Optional[int] = None
    started = time.time()
    try:
        token = await current_token(request)
        raw = await request.body()  # at most --max-body-bytes: BodyLimit refused anything bigger
        source = await off_loop_if_large(len(raw), _parse_request, raw)
        body, overrides = source.values, {}
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "You must provide a model parameter (a model name, as listed by GET /v1/models).")
        check_model(token, model)
        cap = completion_cap(body)
        if cap is None:  # the cap we reserve is the cap the backend gets
            overrides["max_tokens"] = cap = state.settings.default_max_tokens
        if token.quota is not None:
            need = await off_loop_if_large(len(raw), worst_case, body, cap)
            rid = await _reserve(request, token, need)
        candidates = await state.router.candidates(model)
        if not candidates:
            raise GatewayError(503, await state.router.unavailable_message(model), "server_error", "model_not_available")
    except BaseException as exc:  # refused (or failed) before forwarding: log it, release what it held
        refused = isinstance(exc, APIError)
        await state.reservations.settle(
            {
                "time": started, "token_id": token.id if token else None, "token_name": token.name if token else None,
                "channel_id": None, "channel_name": None, "model": model if isinstance(model, str) else None,
                "prompt_tokens": 0, "completion_tokens": 0, "latency_ms": (time.time() - started) * 1000,
                "first_byte_ms": None, "status": exc.status if refused else 500, "stream": False,
                "error": exc.message if refused else f"the gateway failed before forwarding: {exc!r}",
            },
            rid,
        )
        raise
    stream = bool(body.get("stream"))
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    call = ProxyCall(
        path=path, body=body, source=source, overrides=overrides, body_size=len(raw), model=model, stream=stream,
        client_wants_usage=bool(options.get("include_usage")), token=token, reservation=rid, reserved=need,
    )
    return Relay(call, candidates, router=state.router, reservations=state.reservations, client=state.client,
                 settings=state.settings)


def openai_routes() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions", openapi_extra=_openai_body("chat"))
    async def chat_completions(request: Request) -> Any:
        return await _proxy(request, "/chat/completions")

    @router.post("/v1/completions", openapi_extra=_openai_body("completion"))
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


def _openai_body(kind: str) -> dict:
    """Document the fields the gateway reads (the rest is passed to the backend as is), for /docs and fuzzers."""
    text_or_parts = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "array", "minItems": 1, "items": {"type": "object"}}]}
    properties: dict[str, Any] = {
        "model": {"type": "string", "description": "A model a channel serves (GET /v1/models)."},
        "max_tokens": {"type": "integer", "nullable": True,
                       "description": "Completion cap; the gateway's --default-max-tokens when absent."},
        "n": {"type": "integer", "nullable": True},
        "stream": {"type": "boolean", "nullable": True},
        "stream_options": {"type": "object", "nullable": True, "properties": {"include_usage": {"type": "boolean"}}},
    }
    if kind == "chat":
        properties["messages"] = {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role", "content"],
            "properties": {"role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
                           "content": text_or_parts}}}
        properties["max_completion_tokens"] = {"type": "integer", "nullable": True}
        required = ["model", "messages"]
    else:
        properties["prompt"] = text_or_parts
        required = ["model", "prompt"]
    schema = {"type": "object", "required": required, "properties": properties, "additionalProperties": True}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def collection_routes(res: Resource, *, create: Callable, get: Callable, list_all: Callable, update: Callable,
                      delete: Callable, on_change: Optional[Callable[[Any], None]] = None) -> APIRouter:
    """POST, GET (all and one), PATCH and DELETE for one admin collection, from its models and store methods.

    The store methods are unbound (``Store.create_channel``); ``on_change(app_state)`` runs after a write.
    """
    router = APIRouter(prefix=f"/{res.path}")
    In, Patch = res.create, res.patch
    ItemId = Annotated[int, Path(alias=f"{res.name}_id")]  # /channels/{channel_id}, /tokens/{token_id}

    async def on_store(request: Request, fn: Callable, *args: Any) -> Any:
        store = _state(request).store
        return await store.run(fn, store, *args)

    def check_id(item_id: int) -> None:
        if not _storable_id(item_id):
            raise _not_found(res.name, item_id)

    def changed(request: Request) -> None:
        if on_change is not None:
            on_change(_state(request))

    async def add(data: In, request: Request) -> Any:
        out = await on_store(request, create, data)
        changed(request)
        return out

    async def list_items(request: Request) -> Any:
        return await on_store(request, list_all)

    async def get_item(item_id: ItemId, request: Request) -> Any:
        check_id(item_id)
        item = await on_store(request, get, item_id)
        if item is None:
            raise _not_found(res.name, item_id)
        return item

    async def update_item(item_id: ItemId, patch: Patch, request: Request) -> Any:
        check_id(item_id)
        item = await on_store(request, update, item_id, patch)
        if item is None:
            raise _not_found(res.name, item_id)
        changed(request)
        return item

    async def delete_item(item_id: ItemId, request: Request) -> dict:
        check_id(item_id)
        if not await on_store(request, delete, item_id):
            raise _not_found(res.name, item_id)
        changed(request)
        return {"id": item_id, "deleted": True}

    one = f"/{{{res.name}_id}}"
    router.add_api_route("", add, methods=["POST"], status_code=201, response_model=res.created,
                         name=f"add_{res.name}")
    router.add_api_route("", list_items, methods=["GET"], response_model=list[res.out], name=f"list_{res.path}")
    router.add_api_route(one, get_item, methods=["GET"], response_model=res.out, name=f"get_{res.name}")
    router.add_api_route(one, update_item, methods=["PATCH"], response_model=res.out, name=f"update_{res.name}")
    router.add_api_route(one, delete_item, methods=["DELETE"], name=f"delete_{res.name}")
    return router


def admin_routes() -> APIRouter:
    api = APIRouter(prefix="/api", dependencies=[Depends(require_admin)])

    def channels_changed(state: Any) -> None:
        state.router.invalidate()

    api.include_router(collection_routes(
        CHANNELS, create=Store.create_channel, get=Store.get_channel, list_all=Store.list_channels,
        update=Store.update_channel, delete=Store.delete_channel, on_change=channels_changed,
    ))
    api.include_router(collection_routes(
        TOKENS, create=Store.create_token, get=Store.get_token, list_all=Store.list_tokens,
        update=Store.update_token, delete=Store.delete_token,
    ))

    @api.post("/channels/{channel_id}/test")
    async def test(channel_id: int, request: Request) -> ChannelTestResult:
        state = _state(request)
        channel = await state.store.run(state.store.get_channel, channel_id) if _storable_id(channel_id) else None
        if channel is None:
            raise _not_found("channel", channel_id)
        result = await test_channel(state.client, channel, state.settings)
        await state.store.run(state.store.record_test, channel_id, result.latency_ms if result.ok else None)
        if result.ok and channel.auto_disabled:
            await state.store.run(state.store.set_auto_disabled, channel_id, False)
            state.router.invalidate()
        return result

    @api.get("/logs")
    async def logs(request: Request, filters: Annotated[LogFilter, Query()]) -> list[LogOut]:
        store = _state(request).store
        return await store.run(store.logs, filters)

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
        tasks = [
            asyncio.create_task(app.state.router.probe_forever(app.state.client), name="gateway-health-probe"),
            asyncio.create_task(app.state.reservations.keep_alive_forever(), name="gateway-reservations"),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await app.state.client.aclose()
            if own_store:
                store.close()

    app = FastAPI(title="llama-lab gateway", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    app.state.store = store
    app.state.admin_key = admin_key
    app.state.router = Router(store, settings)
    app.state.reservations = Reservations(store, settings.reservation_ttl)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    install_cors(app, settings.cors_origins, methods=["*"])  # outside BodyLimit: a 413 carries CORS headers too

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app.include_router(openai_routes())
    app.include_router(admin_routes())
    add_page(app, "/admin", pathlib.Path(__file__).parent / "static", index="admin.html")  # the admin console
    add_redirect(app, "/", "/admin")
    return app
