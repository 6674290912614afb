"""The OpenAI-compatible HTTP app: ``create_app(engine, settings)``.

One event generator serves both modes: the SSE route serializes it as chunks, the JSON route
collects it. Every route watches for the client going away and cancels its requests in the
engine, streaming or not, so a stopped chat stops the hardware within one decoding step.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import inspect
import json
import logging
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError

from llama_lab.cors import install_cors
from llama_lab.engine import AsyncStreams, Delta, Engine, EngineClosed, EngineOverloaded
from llama_lab.errors import APIError, install_error_handlers
from llama_lab.metrics import ServerMetrics
from llama_lab.protocol import ChatCompletionRequest, CompletionRequest, Defaults, EmbeddingRequest, _Request
from llama_lab.settings import ServerSettings

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class _Choice:
    """What the JSON (non-streaming) answer accumulates per choice."""

    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """Build the app around an already running engine; several apps may live in one process."""
    settings = settings or ServerSettings()
    loaded = engine.loaded
    served = settings.model_name or [loaded.name]
    defaults = Defaults(max_tokens=settings.default_max_tokens, temperature=settings.default_temperature,
                        top_p=settings.default_top_p)
    metrics = ServerMetrics(engine)
    # Clients such as `requests.post(url, data=json.dumps(body))` send JSON without a JSON content type.
    lenient = {"strict_content_type": False} if "strict_content_type" in inspect.signature(FastAPI).parameters else {}
    app = FastAPI(title="llama_lab", version="0.1.0", docs_url="/docs", redoc_url=None, **lenient)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    install_error_handlers(app)
    install_cors(app, settings.cors_origins, methods=["GET", "POST", "OPTIONS"])
    app.add_middleware(metrics.asgi_middleware)
    app.add_middleware(_JsonBodies)

    async def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.get_secret_value().encode()):
            raise APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                           type="invalid_request_error", code="invalid_api_key")

    def model_name(requested: str | None) -> str:
        return requested if requested in served else served[0]

    def token_ids(inputs: list[str | list[int]], param: str) -> list[list[int]]:
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

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served[0], "mode": loaded.mode.value, "device": str(loaded.device),
                "running": engine.stats.running, "waiting": engine.stats.waiting}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def list_models() -> dict[str, Any]:
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "llama_lab",
             "context_length": loaded.context_length, "load_mode": loaded.mode.value}
            for name in served
        ]}

    # ---------------------------------------------------------------- generation routes

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        try:
            prompt = loaded.chat_prompt_ids([m.as_template_message() for m in body.messages])
        except TemplateError as exc:
            raise APIError(400, f"the model's chat template rejected these messages: {exc}", param="messages") from None
        return await _respond(request, body, [prompt] * body.n, kind="chat")

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompts = token_ids(body.prompts(), "prompt")
        return await _respond(request, body, [p for p in prompts for _ in range(body.n)], kind="text")

    @app.post("/v1/embeddings", dependencies=[Depends(check_key)])
    async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
        inputs = token_ids(body.inputs(), "input")
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
        return {"object": "list", "data": data, "model": model_name(body.model),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # ---------------------------------------------------------------- the one generation path

    async def _respond(request: Request, body: _Request, prompts: list[list[int]], kind: str) -> Response:
        if body.ignored_fields():
            logger.debug("ignoring unsupported request fields: %s", ", ".join(body.ignored_fields()))
        jobs = []
        for i, ids in enumerate(prompts):
            params = body.to_sampling_params(prompt_tokens=len(ids), context_length=loaded.context_length,
                                             defaults=defaults, index=i)
            jobs.append((ids, params))
        try:
            streams = AsyncStreams(engine, jobs)
        except EngineOverloaded as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        except EngineClosed:
            raise APIError(503, "the server is shutting down", type="server_error") from None
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages" if kind == "chat" else "prompt") from None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        meta = _Meta(rid=rid, created=int(time.time()), model=model_name(body.model), kind=kind,
                     prompt_tokens=sum(len(ids) for ids in prompts[:: max(1, body.n)]),
                     echo_texts=[loaded.tokenizer.decode(ids) for ids in prompts] if getattr(body, "echo", False) else None)
        events = _guarded(request, streams, metrics)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EventStream(_sse(events, meta, include_usage, n=len(prompts)), on_close=streams.cancel,
                                media_type="text/event-stream", headers=SSE_HEADERS)
        return JSONResponse(await _collect(events, meta, n=len(prompts)))

    return app


class _JsonBodies:
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


class _EventStream(StreamingResponse):
    """A StreamingResponse that cancels its engine requests however it ends.

    If the client is gone before the body iterator even starts, the iterator's own ``finally``
    never runs; this one always does.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


@dataclass
class _Meta:
    rid: str
    created: int
    model: str
    kind: str  # "chat" or "text"
    prompt_tokens: int
    echo_texts: list[str] | None = None


async def _guarded(request: Request, streams: AsyncStreams, metrics: ServerMetrics) -> AsyncIterator[tuple[int, Delta]]:
    """The engine's deltas, cancelled the moment the client disconnects.

    The watcher reads ``http.disconnect`` itself instead of waiting for a failed write, so a
    client that leaves during prefill or during a non-streaming request is noticed too.
    ``finally`` (not ``except CancelledError``) because a generator closed at ``yield`` sees
    ``GeneratorExit``.
    """
    started = time.perf_counter()
    metrics.in_flight.inc()

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                if any(not h.done.is_set() for h in streams.handles):
                    metrics.disconnects.inc()
                    logger.info("client went away; cancelling %d request(s)", len(streams.handles))
                streams.cancel()
                return

    watcher = asyncio.create_task(watch())
    first = True
    try:
        async for index, delta in streams:
            if first and (delta.text or delta.token_ids):
                metrics.ttft.observe(time.perf_counter() - started)
                first = False
            if delta.finish_reason is not None:
                metrics.count_tokens(delta)
            yield index, delta
    finally:
        watcher.cancel()
        streams.cancel()
        metrics.in_flight.dec()


def _finish_reason(delta: Delta) -> str:
    if delta.finish_reason in ("stop", "length"):
        return delta.finish_reason
    raise APIError(500 if delta.finish_reason == "error" else 503,
                   f"generation ended early: {delta.error or delta.finish_reason}", type="server_error")


def _chunk(meta: _Meta, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
    obj = "chat.completion.chunk" if meta.kind == "chat" else "text_completion"
    payload: dict[str, Any] = {"id": meta.rid, "object": obj, "created": meta.created, "model": meta.model,
                               "system_fingerprint": "llama_lab", "choices": choices}
    if usage is not None:
        payload["usage"] = usage
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(meta: _Meta, completion: int) -> dict[str, int]:
    return {"prompt_tokens": meta.prompt_tokens, "completion_tokens": completion,
            "total_tokens": meta.prompt_tokens + completion}


def _chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    def one(e: dict[str, Any]) -> dict[str, Any]:
        return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode())}
    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e["top_logprobs"]]} for e in entries]}


def _text_logprobs(entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    offsets, pos = [], offset
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


async def _sse(events: AsyncIterator[tuple[int, Delta]], meta: _Meta, include_usage: bool, n: int) -> AsyncIterator[str]:
    """OpenAI's streaming format: one id, a role chunk, content chunks, a finish chunk, [DONE]."""
    completion = 0
    try:
        if meta.kind == "chat":
            yield _chunk(meta, [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None} for i in range(n)])
        elif meta.echo_texts:
            yield _chunk(meta, [{"index": i, "text": t, "logprobs": None, "finish_reason": None}
                                for i, t in enumerate(meta.echo_texts)])
        async for index, delta in events:
            finish = None
            if delta.finish_reason is not None:
                completion += delta.completion_tokens
                finish = _finish_reason(delta)
            if not (delta.text or delta.logprobs or finish):
                continue
            if meta.kind == "chat":
                choice: dict[str, Any] = {"index": index, "delta": {"content": delta.text} if delta.text or not finish else {},
                                          "logprobs": _chat_logprobs(delta.logprobs) if delta.logprobs else None,
                                          "finish_reason": finish}
            else:
                choice = {"index": index, "text": delta.text,
                          "logprobs": _text_logprobs(delta.logprobs) if delta.logprobs else None, "finish_reason": finish}
            yield _chunk(meta, [choice])
        if include_usage:
            yield _chunk(meta, [], _usage(meta, completion))
        yield "data: [DONE]\n\n"
    except APIError as exc:  # after the 200 went out: say it in the text too, since NextChat drops error chunks
        logger.warning("stream %s ended with an error: %s", meta.rid, exc.message)
        if meta.kind == "chat":
            yield _chunk(meta, [{"index": 0, "delta": {"content": f"\n[error: {exc.message}]"}, "finish_reason": "stop"}])
        yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"


async def _collect(events: AsyncIterator[tuple[int, Delta]], meta: _Meta, n: int) -> dict[str, Any]:
    """The non-streaming answer: the same events, gathered."""
    choices = [_Choice() for _ in range(n)]
    async for index, delta in events:
        c = choices[index]
        c.text.append(delta.text)
        c.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            c.finish_reason = _finish_reason(delta)
            c.completion_tokens = delta.completion_tokens
    out = []
    for i, c in enumerate(choices):
        text = "".join(c.text)
        if meta.kind == "chat":
            out.append({"index": i, "message": {"role": "assistant", "content": text},
                        "logprobs": _chat_logprobs(c.logprobs) if c.logprobs else None, "finish_reason": c.finish_reason})
        else:
            prefix = meta.echo_texts[i] if meta.echo_texts else ""
            out.append({"index": i, "text": prefix + text,
                        "logprobs": _text_logprobs(c.logprobs, len(prefix)) if c.logprobs else None,
                        "finish_reason": c.finish_reason})
    return {"id": meta.rid, "object": "chat.completion" if meta.kind == "chat" else "text_completion",
            "created": meta.created, "model": meta.model, "system_fingerprint": "llama_lab", "choices": out,
            "usage": _usage(meta, sum(c.completion_tokens for c in choices))}


def mean_pooled_embeddings(loaded: Any, inputs: list[list[int]]) -> list[list[float]]:
    """Mean of the last hidden states over each input's tokens, L2-normalized (as the old demo offered)."""
    import torch

    base = loaded.model.get_decoder() if hasattr(loaded.model, "get_decoder") else loaded.model.model
    out = []
    with torch.inference_mode():
        for ids in inputs:
            hidden = base(input_ids=torch.tensor([ids], device=loaded.device)).last_hidden_state[0].float()
            vec = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)
            out.append(vec.cpu().tolist())
    return out
