"""The admin REST API under ``/api``: channels and tokens (CRUD), channel tests, the request log.

Its client is ``admin.Gateway``; both derive their shapes from ``schemas``.

No ``from __future__ import annotations`` here: the collection routes are built per collection and
FastAPI reads their body and response models from annotations evaluated when they are defined.
"""

from typing import Annotated, Any, Callable, Optional

from fastapi import APIRouter, Depends, Path, Query, Request

from llama_lab.gateway.auth import require_admin
from llama_lab.gateway.errors import GatewayError
from llama_lab.gateway.routing import test_channel
from llama_lab.gateway.schemas import CHANNELS, TOKENS, ChannelTestResult, LogFilter, LogOut, Resource
from llama_lab.gateway.store import Store


def _not_found(kind: str, item_id: int) -> GatewayError:
    return GatewayError(404, f"No {kind} with id {item_id}.", "invalid_request_error", "not_found")


def _storable_id(item_id: int) -> bool:
    """Ids are 32-bit in the database: a bigger one names nothing (and the driver would raise, not answer)."""
    return -(2**31) <= item_id < 2**31


def collection_routes(res: Resource, *, create: Callable, get: Callable, list_all: Callable, update: Callable,
                      delete: Callable, on_change: Optional[Callable[[Any], None]] = None) -> APIRouter:
    """POST, GET (all and one), PATCH and DELETE for one admin collection, from its models and store methods.

    The store methods are unbound (``Store.create_channel``); ``on_change(app_state)`` runs after a write.
    """
    router = APIRouter(prefix=f"/{res.path}")
    In, Patch = res.create, res.patch
    ItemId = Annotated[int, Path(alias=f"{res.name}_id")]  # /channels/{channel_id}, /tokens/{token_id}

    async def on_store(request: Request, fn: Callable, *args: Any) -> Any:
        store = request.app.state.store
        return await store.run(fn, store, *args)

    def check_id(item_id: int) -> None:
        if not _storable_id(item_id):
            raise _not_found(res.name, item_id)

    def changed(request: Request) -> None:
        if on_change is not None:
            on_change(request.app.state)

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
        state = request.app.state
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
        store = request.app.state.store
        return await store.run(store.logs, filters)

    return api
