"""One OpenAI request through the gateway: reserve its worst-case cost, proxy it, settle what it used.

``relay`` checks the caller and the body, holds the quota the request may cost (the prompt's byte
bound, or its exact count from the channel when the bound does not fit, plus the completion cap), and hands a ``Relay`` response the channels to try; the ``Relay`` settles the
reservation against the usage the backend reported. A request refused before it is forwarded is
logged and its reservation released here.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from fastapi import Request

from llama_lab.gateway.auth import check_model, current_token
from llama_lab.gateway.body import JsonObject, off_loop_if_large, parse_object
from llama_lab.gateway.errors import GatewayError
from llama_lab.gateway.proxy import ProxyCall, Relay
from llama_lab.gateway.quota import choices, completion_cap, worst_case
from llama_lab.gateway.schemas import Channel, TokenOut, period_bounds
from llama_lab.gateway.store import Admission
from llama_lab.web.errors import APIError


async def reserve(request: Request, token: TokenOut, path: str, body: dict[str, Any], cap: int,
                  candidates: list[Channel], bound: int | None) -> tuple[int | None, int | None]:
    """Admit the request against the token's limits: ``(reservation, tokens held)``, or a 429.

    ``bound`` is the request's worst case from its prompt's bytes (None for a token without a quota,
    which holds nothing but still counts against ``max_parallel`` and ``rpm_limit``). The byte bound is
    tried first (no round trip). When the quota refuses it, the first channel's ``/tokenize`` counts
    the prompt exactly and that smaller amount is tried; failing both, a 429 says how much was needed
    and how much is free. A rate limit answers OpenAI's ``rate_limit_exceeded`` with ``retry-after``.
    """
    state = request.app.state
    admission = await state.reservations.take(token.id, bound or 0)
    if admission.reservation is not None:
        return admission.reservation, bound
    if admission.refused in ("parallel", "rpm"):
        raise rate_limited(token, admission)
    if admission.refused == "lifetime" and admission.current is not None and admission.current >= (admission.limit or 0):
        raise GatewayError(429, f"Token '{token.name}' has reached its lifetime cap: {admission.current} of "
                           f"{admission.limit} tokens used over all periods. Ask the gateway admin to raise it.",
                           "insufficient_quota", "insufficient_quota")
    need, counted = bound or 0, None
    if candidates:
        counted = await state.prompt_counter.count(candidates[0], path, body)
    if counted is not None:
        need = counted + max(cap, 0) * choices(body)
        admission = await state.reservations.take(token.id, need)
        if admission.reservation is not None:
            return admission.reservation, need
        if admission.refused in ("parallel", "rpm"):
            raise rate_limited(token, admission)
    used, reserved, quota = await state.store.run(state.store.quota_state, token.id)
    if quota is None and admission.refused != "lifetime":  # made unlimited since we read it
        return None, None
    resets = ""
    if token.budget_period is not None:
        when = datetime.fromtimestamp(period_bounds(token.budget_period, time.time())[1], timezone.utc)
        resets = f" Its {token.budget_period} quota resets at {when:%Y-%m-%d %H:%M} UTC."
    if admission.refused == "lifetime":
        message = (f"Token '{token.name}' has not enough of its lifetime cap left for this request: it needs {need} "
                   f"tokens, and {max((admission.limit or 0) - (admission.current or 0), 0)} of its {admission.limit} "
                   "are left. Lower max_tokens, or ask the gateway admin to raise the cap.")
    elif used >= quota:
        message = (f"Token '{token.name}' has exhausted its quota: {used} of {quota} tokens used.{resets} "
                   "Ask the gateway admin to raise the quota.")
    else:
        free = max(quota - used - reserved, 0)
        basis = (f"its prompt of {counted} tokens, as the channel's tokenizer counts it, plus max_tokens"
                 if counted is not None else "the prompt's upper bound from its bytes, plus max_tokens")
        message = (
            f"Token '{token.name}' has not enough quota left for this request: it needs {need} tokens ({basis}), "
            f"and {free} of its {quota}-token quota are free ({used} used, {reserved} held by requests in flight).{resets} "
            "Lower max_tokens, or ask the gateway admin to raise the quota."
        )
    raise GatewayError(429, message, "insufficient_quota", "insufficient_quota")


def rate_limited(token: TokenOut, admission: Admission) -> GatewayError:
    """OpenAI's 429 for a rate limit: the error, ``retry-after`` and the ``x-ratelimit-*`` headers."""
    wait = admission.retry_after or 1
    if admission.refused == "rpm":
        message = (f"Rate limit reached for token '{token.name}' on requests per min (RPM): Limit {admission.limit}, "
                   f"Used {admission.current}, Requested 1. Please try again in {wait}s.")
        headers = {"x-ratelimit-limit-requests": str(admission.limit), "x-ratelimit-remaining-requests": "0",
                   "x-ratelimit-reset-requests": f"{wait}s"}
    else:
        message = (f"Rate limit reached for token '{token.name}' on requests in flight: Limit {admission.limit}, "
                   f"In flight {admission.current}. Please try again when one of them has finished.")
        headers = {}
    return GatewayError(429, message, "requests", "rate_limit_exceeded",
                        headers={"retry-after": str(wait), "x-should-retry": "true", **headers})


def _parse_request(raw: bytes) -> JsonObject:
    try:
        body = parse_object(raw)
    except ValueError as exc:
        raise GatewayError(400, f"The request body is not valid JSON: {exc}.") from exc
    if not isinstance(body.values, dict):
        raise GatewayError(400, "The request body must be a JSON object.")
    return body


async def relay(request: Request, path: str) -> Relay:
    """Check, reserve and route one request to ``path`` upstream; the returned response proxies and settles it."""
    state = request.app.state
    token: TokenOut | None = None
    model: Any = None
    rid: int | None = None
    need: int | None = None
    started, arrived = time.time(), time.perf_counter()
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
        candidates = await state.router.candidates(model)
        if any(v is not None for v in (token.quota, token.lifetime_cap, token.rpm_limit, token.max_parallel)):
            counted = token.quota is not None or token.lifetime_cap is not None
            bound = await off_loop_if_large(len(raw), worst_case, body, cap) if counted else None
            rid, need = await reserve(request, token, path, body, cap, candidates, bound)
        if not candidates:
            raise GatewayError(503, await state.router.unavailable_message(model), "server_error", "model_not_available")
    except BaseException as exc:  # refused (or failed) before forwarding: log it, release what it held
        refused = isinstance(exc, APIError)
        entry = {
            "time": started, "token_id": token.id if token else None, "token_name": token.name if token else None,
            "channel_id": None, "channel_name": None, "model": model if isinstance(model, str) else None,
            "prompt_tokens": 0, "completion_tokens": 0, "latency_ms": (time.perf_counter() - arrived) * 1000,
            "first_byte_ms": None, "status": exc.status if refused else 500, "stream": False,
            "error": exc.message if refused else f"the gateway failed before forwarding: {exc!r}",
        }
        await state.reservations.settle(entry, rid)
        state.metrics.observe(entry, None)
        raise
    stream = bool(body.get("stream"))
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    call = ProxyCall(
        path=path, body=body, source=source, overrides=overrides, body_size=len(raw), model=model, stream=stream,
        client_wants_usage=bool(options.get("include_usage")), token=token, reservation=rid, reserved=need,
        started=arrived, started_wall=started,
    )
    return Relay(call, candidates, router=state.router, reservations=state.reservations, client=state.client,
                 settings=state.settings, metrics=state.metrics)
