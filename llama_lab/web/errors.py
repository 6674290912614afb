"""Errors in OpenAI's shape for both HTTP apps, raised anywhere and rendered in one place."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error a client can act on: ``{"error": {message, type, param, code}}`` with a status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|literal\[.*\]|function-.*)$")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    # drop where it came from ("body", "query") and pydantic's union-branch tags ("content.str",
    # "prompt.list[int]"): clients name fields
    loc = [str(p) for i, p in enumerate(first.get("loc", ()))
           if not (i == 0 and p in ("body", "query")) and not _UNION_TAG.match(str(p))]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg')}", None
    if not loc and first.get("type") in {"model_attributes_type", "dict_type"}:
        return "the request body must be a JSON object", None
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    return (f"invalid value for '{param}': {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    """Every error, from validation to an unexpected bug, leaves as OpenAI-shaped JSON.

    An ``APIError``'s ``headers`` (``Retry-After``, ``x-should-retry``) go out with it.
    """

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, param=param, code="invalid_value" if param else None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            detail = f"unknown path {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        return JSONResponse(error_body(detail, kind), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {exc.__class__.__name__}: {exc}", "server_error"), status_code=500)
