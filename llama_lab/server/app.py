"""The OpenAI-compatible HTTP app: ``create_app(engine, settings)``.

The app holds its engine, settings and metrics in ``app.state``; the routes (``routes.py``) read
them from there, so several apps can live in one process (tests, notebooks).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from llama_lab.engine import Engine
from llama_lab.engine.grammar import GrammarCompiler
from llama_lab.model.chat import tool_format
from llama_lab.server.metrics import ServerMetrics
from llama_lab.server.protocol import Defaults
from llama_lab.server.routes import router
from llama_lab.server.settings import ServerSettings
from llama_lab.web.body_limit import BodyLimit
from llama_lab.web.cors import install_cors
from llama_lab.web.errors import install_error_handlers
from llama_lab.web.pages import add_page


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """Build the app around an already running engine."""
    settings = settings or ServerSettings()
    served = settings.model_name or [engine.loaded.name]
    # Clients such as `requests.post(url, data=json.dumps(body))` send JSON without a JSON content type.
    lenient = {"strict_content_type": False} if "strict_content_type" in inspect.signature(FastAPI).parameters else {}
    app = FastAPI(title="llama_lab", version="0.1.0", docs_url="/docs", redoc_url=None, **lenient)
    state = app.state
    state.engine, state.settings, state.served = engine, settings, served
    state.metrics = ServerMetrics(engine)
    state.defaults = Defaults(max_tokens=settings.default_max_tokens, temperature=settings.default_temperature,
                              top_p=settings.default_top_p)
    # Structured outputs: grammars compiled for this model's tokenizer (cached), calls read in its template's format.
    state.grammars = GrammarCompiler(engine.loaded.tokenizer, engine.loaded.stop_token_ids)
    state.tool_format = tool_format(engine.loaded.tokenizer)
    state.model_name = lambda requested: requested if requested in served else served[0]
    install_error_handlers(app)
    # Added first, so it runs inside CORS and metrics: a 413 is counted and readable by a browser page.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    install_cors(app, settings.cors_origins, methods=["GET", "POST", "OPTIONS"])
    app.add_middleware(state.metrics.asgi_middleware)
    app.add_middleware(JsonBodies)
    app.include_router(router)
    add_page(app, "/", Path(__file__).parent / "static")  # the playground
    return app


class JsonBodies:
    """Read POST bodies as JSON whatever content type a client claims.

    ``curl -d '{...}'`` without ``-H`` says form-urlencoded; an API that only speaks JSON gains
    nothing by refusing it. A body that is not JSON still gets a clear 400.
    """

    _LOOSE = (b"application/x-www-form-urlencoded", b"text/plain")

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, b"application/json" if k == b"content-type" and v.startswith(self._LOOSE) else v)
                       for k, v in scope["headers"]]
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)
