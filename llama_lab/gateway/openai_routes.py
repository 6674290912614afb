"""The routes OpenAI clients call: chat and text completions (relayed), the model list, NextChat's billing.

Bodies are not declared as pydantic models: the gateway reads a few fields and passes the rest to
the backend untouched. ``_openai_body`` documents what it reads, for ``/docs`` and fuzzers.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from llama_lab.gateway.auth import current_token
from llama_lab.gateway.relay import relay
from llama_lab.gateway.schemas import TokenOut
from llama_lab.web import billing


def openai_routes() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions", openapi_extra=_openai_body("chat"))
    async def chat_completions(request: Request) -> Any:
        return await relay(request, "/chat/completions")

    @router.post("/v1/completions", openapi_extra=_openai_body("completion"))
    async def completions(request: Request) -> Any:
        return await relay(request, "/completions")

    @router.get("/v1/models")
    async def models(request: Request, token: TokenOut = Depends(current_token)) -> dict:
        names = await request.app.state.router.models()
        if token.models:
            names = [m for m in names if m in token.models]
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "llama-lab-gateway"} for m in names]}

    async def subscription(request: Request, token: TokenOut = Depends(current_token)) -> dict:
        """The calling token's quota (none: no limit) and expiry."""
        return billing.subscription(token.quota, request.app.state.settings.tokens_per_usd, int(token.expires_at or 0))

    async def usage(request: Request, token: TokenOut = Depends(current_token)) -> dict:
        """What the calling token has used, whatever dates NextChat asks about."""
        return billing.usage(token.used, request.app.state.settings.tokens_per_usd)

    billing.add_billing_routes(router, subscription, usage)
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
