"""The gateway's app factory: ``create_gateway_app(settings)`` assembles auth, relay and admin API.

The app holds its settings, store, router, reservations, metrics and HTTP client in ``app.state``; the
routes (``openai_routes``, ``admin_api``) read them from there, so several gateways can share a
process (tests, notebooks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import secrets
from collections.abc import AsyncIterator

import httpx
from fastapi import Depends, FastAPI, Response
from fastapi.responses import JSONResponse

from llama_lab.gateway.admin_api import admin_routes
from llama_lab.gateway.auth import require_admin
from llama_lab.gateway.metrics import GatewayMetrics
from llama_lab.gateway.openai_routes import openai_routes
from llama_lab.gateway.quota import PromptCounter, Reservations
from llama_lab.gateway.routing import Router
from llama_lab.gateway.settings import GatewaySettings
from llama_lab.gateway.store import Store
from llama_lab.web.body_limit import BodyLimit
from llama_lab.web.cors import install_cors
from llama_lab.web.errors import install_error_handlers
from llama_lab.web.pages import add_page, add_redirect

log = logging.getLogger(__name__)


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
        app.state.prompt_counter = PromptCounter(app.state.client, timeout_s=settings.connect_timeout + 5.0)
        tasks = [
            asyncio.create_task(app.state.router.probe_forever(app.state.client), name="gateway-health-probe"),
            asyncio.create_task(app.state.reservations.keep_alive_forever(), name="gateway-reservations"),
            asyncio.create_task(app.state.router.exchange_stats_forever(), name="gateway-routing-stats"),
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
    app.state.metrics = GatewayMetrics(store, app.state.router)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, who="this gateway",
                       remedy="ask the gateway admin to raise --max-body-bytes")
    install_cors(app, settings.cors_origins, methods=["*"])  # outside BodyLimit: a 413 carries CORS headers too

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", dependencies=[Depends(require_admin)])
    async def metrics() -> Response:
        """Prometheus text; behind the admin key, since it names tokens and their quota left."""
        body, content_type = await store.run(app.state.metrics.render)  # reads the database: off the loop
        return Response(body, media_type=content_type)

    app.include_router(openai_routes())
    app.include_router(admin_routes())
    add_page(app, "/admin", pathlib.Path(__file__).parent / "static", index="admin.html")  # the admin console
    add_redirect(app, "/", "/admin")
    return app
