"""The one generation path of the server: request -> engine streams -> SSE chunks or one JSON body.

One event generator serves both modes: the SSE route serializes it as chunks, the JSON route
collects it. Every request watches for its client going away and cancels its requests in the
engine, streaming or not, so a stopped chat stops the hardware within one decoding step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llama_lab.engine import Delta, Engine, EngineClosed, EngineOverloaded, RequestHandle, SamplingParams
from llama_lab.engine.grammar import CompiledGrammar, GrammarError
from llama_lab.model.chat import ToolFormat
from llama_lab.server.metrics import ServerMetrics
from llama_lab.server.protocol import ChatCompletionRequest, Defaults, GenerationRequest
from llama_lab.server.tools import ToolCallParser, ToolEvent
from llama_lab.web.errors import APIError

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class _Choice:
    """What the JSON (non-streaming) answer accumulates per choice."""

    text: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0


def completion_budget(prompt_tokens: int, context_length: int, requested: int | None, default: int,
                      param: str = "messages") -> int:
    """How many tokens a request may generate; a 400 worded like OpenAI's when it cannot fit."""
    room = context_length - prompt_tokens
    if requested is not None and requested > room:
        raise APIError(
            400,
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the messages, {requested} in the completion). "
            "Please reduce the length of the messages or completion.",
            param="max_tokens", code="context_length_exceeded",
        )
    if room < 1:
        raise APIError(
            400,
            f"This model's maximum context length is {context_length} tokens. However, your messages resulted in "
            f"{prompt_tokens} tokens. Please reduce the length of the messages.",
            param=param, code="context_length_exceeded",
        )
    return requested if requested is not None else min(default, room)


class AsyncStreams:
    """Several requests' deltas on one asyncio queue, as ``(index, delta)``, for the server.

    Requests are submitted at construction, so a full queue raises before any response byte is
    sent. The engine thread hands events over with ``call_soon_threadsafe``: the event loop never
    blocks on the model and keeps noticing disconnects. Call ``cancel()`` in a ``finally``.
    """

    def __init__(self, engine: Engine, jobs: Sequence[tuple[Sequence[int], SamplingParams]]) -> None:
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
        self.handles: list[RequestHandle] = []
        self._open = len(jobs)

        def sink_for(index: int) -> Callable[[Delta], None]:
            def sink(delta: Delta) -> None:
                try:
                    loop.call_soon_threadsafe(self._queue.put_nowait, (index, delta))
                except RuntimeError:  # the loop is gone (server stopped): nobody is listening
                    self.cancel()
            return sink

        try:
            for i, (ids, params) in enumerate(jobs):
                self.handles.append(engine.submit(ids, params, sink_for(i)))
        except BaseException:
            self.cancel()
            raise

    def __aiter__(self) -> "AsyncStreams":
        return self

    async def __anext__(self) -> tuple[int, Delta]:
        if self._open <= 0:
            raise StopAsyncIteration
        index, delta = await self._queue.get()
        if delta.finish_reason is not None:
            self._open -= 1
        return index, delta

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()



async def respond(request: Request, body: GenerationRequest, prompts: list[list[int]], kind: str) -> Response:
    """Submit one engine request per prompt and answer as SSE or as one JSON body."""
    state = request.app.state
    engine: Engine = state.engine
    defaults: Defaults = state.defaults
    if body.ignored_fields():
        logger.debug("ignoring unsupported request fields: %s", ", ".join(body.ignored_fields()))
    param = "messages" if kind == "chat" else "prompt"
    vocab = len(engine.loaded.tokenizer)
    for token, _ in body.bias_pairs():
        if token >= vocab:
            raise APIError(400, f"logit_bias names token {token}, outside this model's vocabulary (0..{vocab - 1})",
                           param="logit_bias")
    tools = state.tool_format if isinstance(body, ChatCompletionRequest) and body.tool_mode()[0] != "none" else None
    grammar = await _compiled_grammar(state, body, tools)
    jobs = []
    for i, ids in enumerate(prompts):
        budget = completion_budget(len(ids), engine.loaded.context_length, body.requested_max_tokens(),
                                   defaults.max_tokens, param)
        jobs.append((ids, body.to_sampling_params(max_tokens=budget, defaults=defaults, index=i, grammar=grammar)))
    echo_texts = None
    if getattr(body, "echo", False):  # decoding a long prompt is tokenizer work: off the event loop
        tokenizer = engine.loaded.tokenizer
        echo_texts = await asyncio.to_thread(lambda: [tokenizer.decode(ids) for ids in prompts])
    try:
        streams = AsyncStreams(engine, jobs)
    except EngineOverloaded as exc:
        raise APIError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": "1"}) from None
    except EngineClosed:
        raise APIError(503, "the server is shutting down", type="server_error") from None
    except ValueError as exc:
        raise APIError(400, str(exc), param=param) from None
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    meta = _Meta(rid=rid, created=int(time.time()), model=state.model_name(body.model), kind=kind,
                 prompt_tokens=sum(len(ids) for ids in prompts[:: max(1, body.n)]), echo_texts=echo_texts,
                 per_prompt=max(1, body.n), tools=tools,
                 legacy_functions=isinstance(body, ChatCompletionRequest) and body.legacy_functions())
    events = _guarded(request, streams, state.metrics)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _EventStream(_sse(events, meta, include_usage, n=len(prompts)), on_close=streams.cancel,
                            media_type="text/event-stream", headers=SSE_HEADERS)
    return JSONResponse(await _collect(events, meta, n=len(prompts)))


async def _compiled_grammar(state: Any, body: GenerationRequest, tools: ToolFormat | None) -> CompiledGrammar | None:
    """The request's grammar, compiled on a worker thread (cached by schema); a 400 naming the field if invalid."""
    try:
        wanted = body.grammar_spec(tools or state.tool_format)
    except ValueError as exc:
        raise APIError(400, str(exc), param=getattr(body, "tool_choice_param", lambda: None)()) from None
    if wanted is None:
        return None
    spec, field_name = wanted
    try:
        return await asyncio.to_thread(state.grammars.compile, spec)
    except GrammarError as exc:
        raise APIError(400, f"'{field_name}' cannot be enforced: {exc}", param=field_name,
                       code="invalid_schema") from None


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
    per_prompt: int = 1  # choices per prompt (``n``): choice i answers prompt i // per_prompt
    tools: ToolFormat | None = None  # read tool calls out of the answer, in this format
    legacy_functions: bool = False  # answer with ``function_call`` (the request sent ``functions``)

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser(self.tools) if self.tools is not None else None

    def finish(self, reason: str, calls: int) -> str:
        """``tool_calls`` (``function_call`` for legacy requests) when a finished answer called tools."""
        if calls and reason == "stop":
            return "function_call" if self.legacy_functions else "tool_calls"
        return reason


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


def _chat_deltas(meta: _Meta, parser: ToolCallParser | None, text: str, final: bool) -> list[dict[str, Any]]:
    """A text delta as OpenAI's ``delta`` objects: content, or a tool call's name first, then its arguments."""
    if parser is None:
        return [{"content": text}] if text else []
    events = parser.feed(text) + (parser.finish() if final else [])
    return [_event_delta(meta, e) for e in events]


def _event_delta(meta: _Meta, e: ToolEvent) -> dict[str, Any]:
    if e.kind == "content":
        return {"content": e.text}
    if meta.legacy_functions:
        return {"function_call": {"name": e.name, "arguments": ""} if e.kind == "start" else {"arguments": e.text}}
    if e.kind == "start":
        return {"tool_calls": [{"index": e.index, "id": e.id, "type": "function",
                                "function": {"name": e.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]}


def _chunk(meta: _Meta, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
    obj = "chat.completion.chunk" if meta.kind == "chat" else "text_completion"
    payload: dict[str, Any] = {"id": meta.rid, "object": obj, "created": meta.created, "model": meta.model,
                               "system_fingerprint": "llama_lab", "choices": choices}
    if usage is not None:
        payload["usage"] = usage
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(meta: _Meta, completion: int, cached: int) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens the prefix cache held (not computed again)."""
    return {"prompt_tokens": meta.prompt_tokens, "completion_tokens": completion,
            "total_tokens": meta.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": min(cached, meta.prompt_tokens)}}


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
    completion = cached = 0
    parsers = [meta.parser() for _ in range(n)]
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
                cached += delta.cached_tokens if index % meta.per_prompt == 0 else 0  # a prompt counts once
                finish = _finish_reason(delta)
            if not (delta.text or delta.logprobs or finish):
                continue
            if meta.kind == "chat":
                parser = parsers[index]
                deltas = _chat_deltas(meta, parser, delta.text, finish is not None)
                if finish is not None:
                    finish = meta.finish(finish, parser.calls if parser else 0)
                elif not deltas and not delta.logprobs:
                    continue  # held back by the tool-call parser
                deltas = deltas or [{}]
                for j, d in enumerate(deltas):
                    last = j == len(deltas) - 1
                    if not d and not last:
                        continue
                    yield _chunk(meta, [{"index": index, "delta": d,
                                         "logprobs": _chat_logprobs(delta.logprobs) if delta.logprobs and j == 0 else None,
                                         "finish_reason": finish if last else None}])
                continue
            else:
                choice = {"index": index, "text": delta.text,
                          "logprobs": _text_logprobs(delta.logprobs) if delta.logprobs else None, "finish_reason": finish}
            yield _chunk(meta, [choice])
        if include_usage:
            yield _chunk(meta, [], _usage(meta, completion, cached))
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
    parsers = [meta.parser() for _ in range(n)]
    async for index, delta in events:
        c = choices[index]
        final = delta.finish_reason is not None
        if meta.kind == "chat" and parsers[index] is not None:
            for d in _chat_deltas(meta, parsers[index], delta.text, final):
                _gather(c, d)
        else:
            c.text.append(delta.text)
        c.logprobs.extend(delta.logprobs)
        if final:
            c.finish_reason = meta.finish(_finish_reason(delta), len(c.calls))
            c.completion_tokens = delta.completion_tokens
            c.cached_tokens = delta.cached_tokens
    out = []
    for i, c in enumerate(choices):
        text = "".join(c.text)
        if meta.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if c.calls and meta.legacy_functions:
                message.update(content=text or None, function_call=c.calls[0]["function"])
            elif c.calls:
                message.update(content=text or None, tool_calls=c.calls)
            out.append({"index": i, "message": message,
                        "logprobs": _chat_logprobs(c.logprobs) if c.logprobs else None, "finish_reason": c.finish_reason})
        else:
            prefix = meta.echo_texts[i] if meta.echo_texts else ""
            out.append({"index": i, "text": prefix + text,
                        "logprobs": _text_logprobs(c.logprobs, len(prefix)) if c.logprobs else None,
                        "finish_reason": c.finish_reason})
    return {"id": meta.rid, "object": "chat.completion" if meta.kind == "chat" else "text_completion",
            "created": meta.created, "model": meta.model, "system_fingerprint": "llama_lab", "choices": out,
            "usage": _usage(meta, sum(c.completion_tokens for c in choices),
                            sum(c.cached_tokens for c in choices[::meta.per_prompt]))}


def _gather(choice: _Choice, delta: dict[str, Any]) -> None:
    """Fold one chat ``delta`` into the JSON answer's message (as the SDK's stream helpers do)."""
    if "content" in delta:
        choice.text.append(delta["content"])
    parts = delta.get("tool_calls") or ([{"index": len(choice.calls) - ("name" not in delta["function_call"]),
                                          "function": delta["function_call"]}] if "function_call" in delta else [])
    for part in parts:
        if part["index"] >= len(choice.calls):
            choice.calls.append({"id": part.get("id", ""), "type": "function",
                                 "function": {"name": part["function"].get("name", ""), "arguments": ""}})
        choice.calls[part["index"]]["function"]["arguments"] += part["function"].get("arguments", "")
