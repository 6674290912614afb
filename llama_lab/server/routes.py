"""The server's routes, at module level: each reads the engine and settings from ``request.app.state``.

Chat templates and tokenizers run in a worker thread (``asyncio.to_thread``), never on the event
loop, which must keep answering ``/health`` and streaming other requests while a long prompt is
tokenized, and never on the engine thread, which must keep decoding.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from datetime import date
from typing import Any

import psutil
from fastapi import APIRouter, Depends, Request, Response
from jinja2 import TemplateError

from llama_lab.engine import EngineClosed
from llama_lab.model.chat import render_tool_chat
from llama_lab.server.generation import respond
from llama_lab.server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, TokenizeRequest
from llama_lab.web import billing
from llama_lab.web.auth import bearer_token, same_key
from llama_lab.web.errors import APIError

router = APIRouter()


async def check_key(request: Request) -> None:
    """``Authorization: Bearer <key>`` when the server has an API key (constant-time compare)."""
    api_key = request.app.state.settings.api_key
    if api_key is None:
        return
    if not same_key(bearer_token(request.headers) or "", api_key.get_secret_value()):
        raise APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                       type="invalid_request_error", code="invalid_api_key")


def token_ids(loaded: Any, inputs: list[str | list[int]], param: str) -> list[list[int]]:
    """Text is tokenized; ids a client sends must exist in the vocabulary (else the forward pass fails)."""
    vocab = len(loaded.tokenizer)
    out = []
    for p in inputs:
        if isinstance(p, str):
            out.append(loaded.tokenizer.encode(p))
            continue
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside this model's vocabulary (0..{vocab - 1})", param=param)
        out.append(p)
    return out


# ---------------------------------------------------------------- info routes

@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    state = request.app.state
    loaded, stats = state.engine.loaded, state.engine.stats
    return {"status": "ok", "model": state.served[0], "mode": loaded.mode.value, "device": str(loaded.device),
            "running": stats.running, "waiting": stats.waiting, "engine": state.engine.describe(),
            "memory": memory_report(loaded)}


def memory_report(loaded: Any) -> dict[str, float | None]:
    """The process's resident memory and what the model added to it since just before its load (MiB)."""
    rss = psutil.Process().memory_info().rss
    return {"rss_mb": round(rss / 2**20, 1), "weights_mb": round(loaded.weights_bytes / 2**20, 1),
            "model_adds_mb": round((rss - loaded.rss_before_bytes) / 2**20, 1) if loaded.rss_before_bytes else None}


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/models", dependencies=[Depends(check_key)])
async def list_models(request: Request) -> dict[str, Any]:
    state = request.app.state
    loaded = state.engine.loaded
    created = int(time.time())
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "llama_lab",
         "context_length": loaded.context_length, "load_mode": loaded.mode.value}
        for name in state.served
    ]}


# ---------------------------------------------------------------- NextChat's usage panel


async def billing_subscription(request: Request) -> dict[str, Any]:
    """No limit: a local server has no quota (the gateway has)."""
    return billing.subscription(None, request.app.state.settings.tokens_per_usd)


async def billing_usage(request: Request, start_date: date | None = None, end_date: date | None = None) -> dict[str, Any]:
    """Tokens served since the server started, in cents; the dates NextChat sends are not applied."""
    state = request.app.state
    return billing.usage(state.metrics.tokens_used, state.settings.tokens_per_usd)


billing.add_billing_routes(router, billing_subscription, billing_usage, dependencies=[Depends(check_key)])


# ---------------------------------------------------------------- generation routes

async def chat_prompt_ids(loaded: Any, body: ChatCompletionRequest) -> list[int]:
    """The prompt a chat request becomes: its messages and tools through the model's chat template.

    ``/tokenize`` counts with this same function, so its count is the request's ``usage.prompt_tokens``.
    """
    try:
        mode, _ = body.tool_mode()
    except ValueError as exc:
        raise APIError(400, str(exc), param=body.tool_choice_param()) from None
    tools = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in body.function_definitions()]
    messages = [m.as_template_message() for m in body.messages or ()]

    def render() -> list[int]:
        text = render_tool_chat(loaded.tokenizer, messages, tools if mode != "none" else None)
        return loaded.tokenizer.encode(text, add_special_tokens=False)

    try:
        return await asyncio.to_thread(render)
    except TemplateError as exc:
        raise APIError(400, f"the model's chat template rejected these messages: {exc}", param="messages") from None


@router.post("/v1/chat/completions", dependencies=[Depends(check_key)])
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    prompt = await chat_prompt_ids(request.app.state.engine.loaded, body)
    return await respond(request, body, [prompt] * body.n, kind="chat")


@router.post("/tokenize", dependencies=[Depends(check_key)])
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    """Count a request's prompt as generation would (a gateway's quota, a client's budget)."""
    loaded = request.app.state.engine.loaded
    if body.messages is not None:
        ids = await chat_prompt_ids(loaded, body)
    else:
        (ids,) = await asyncio.to_thread(token_ids, loaded, [body.prompt], "prompt")
    return {"count": len(ids), "max_model_len": loaded.context_length, "tokens": ids}


@router.post("/v1/completions", dependencies=[Depends(check_key)])
async def completions(body: CompletionRequest, request: Request) -> Response:
    prompts = await asyncio.to_thread(token_ids, request.app.state.engine.loaded, body.prompts(), "prompt")
    return await respond(request, body, [p for p in prompts for _ in range(body.n)], kind="text")


@router.post("/v1/embeddings", dependencies=[Depends(check_key)])
async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    state = request.app.state
    engine, loaded = state.engine, state.engine.loaded
    inputs = await asyncio.to_thread(token_ids, loaded, body.inputs(), "input")
    if any(not ids for ids in inputs):
        raise APIError(400, "an input is empty", param="input")
    for i, ids in enumerate(inputs):
        if len(ids) > loaded.context_length:
            raise APIError(400, f"input {i} has {len(ids)} tokens; this model's maximum context length is "
                                f"{loaded.context_length} tokens", param="input", code="context_length_exceeded")
    try:
        vectors = await asyncio.wrap_future(engine.call(lambda: mean_pooled_embeddings(loaded, inputs)))
    except EngineClosed:
        raise APIError(503, "the server is shutting down", type="server_error") from None
    data = []
    for i, vec in enumerate(vectors):
        value: Any = vec if body.encoding_format == "float" else base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(len(ids) for ids in inputs)
    return {"object": "list", "data": data, "model": state.model_name(body.model),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def mean_pooled_embeddings(loaded: Any, inputs: list[list[int]]) -> list[list[float]]:
    """Mean of the last hidden states over each input's tokens, L2-normalized.

    The old demo's pooling: its clients get the vectors they were built against.
    """
    import torch

    base = loaded.model.get_decoder() if hasattr(loaded.model, "get_decoder") else loaded.model.model
    out = []
    with torch.inference_mode():
        for ids in inputs:
            hidden = base(input_ids=torch.tensor([ids], device=loaded.device)).last_hidden_state[0].float()
            vec = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)
            out.append(vec.cpu().tolist())
    return out
