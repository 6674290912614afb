"""One OpenAI request through the gateway: reserve its worst-case cost, proxy it, settle what it used.

``relay`` checks the caller and the body, holds the quota the request may cost (the prompt's byte
bound, or its exact count from the channel when the bound does not fit, plus the completion cap) and
counts it against the token's rate limits (its own and the model's), and hands a ``Relay`` response the
channels to try, with the ``x-ratelimit-*`` headers to send; the ``Relay`` settles the reservation
against the usage the backend reported. A request refused before it is forwarded is logged and its
reservation released here.
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
                  candidates: list[Channel], bound: int | None, model: str) -> tuple[Admission | None, int | None]:
    """Admit the request against the token's limits: ``(admission, tokens held)``, or a 429.

    ``bound`` is the request's worst case from its prompt's bytes (None for a token without a quota or a
    tokens-per-minute limit, which holds nothing but still counts against ``max_parallel`` and the
    requests per minute). The byte bound is tried first (no round trip). When the quota or a minute's
    tokens refuse it, the first channel's ``/tokenize`` counts the prompt exactly and that smaller amount
    is tried; failing both, a 429 says how much was needed and how much is free. A rate limit answers
    OpenAI's ``rate_limit_exceeded`` with ``retry-after``.
    """
    state = request.app.state
    admission = await state.reservations.take(token.id, bound or 0, model)
    if admission.reservation is not None:
        return admission, bound
    if admission.refused in ("parallel", "rpm"):
        raise rate_limited(token, admission)
    if admission.refused == "lifetime" and admission.current is not None and admission.current >= (admission.limit or 0):
        raise GatewayError(429, f"Token '{token.name}' has reached its lifetime cap: {admission.current} of "
                           f"{admission.limit} tokens used over all periods. Ask the gateway admin to raise it.",
                           "insufficient_quota", "insufficient_quota")
    if admission.refused in ("tpm", "too_large") and not _count_may_fit(admission, body, cap):
        raise rate_limited(token, admission)
    need, counted = bound or 0, None
    if candidates:
        counted = await state.prompt_counter.count(candidates[0], path, body)
    if counted is not None:
        need = worst_case(body, cap, prompt_tokens=counted)
        admission = await state.reservations.take(token.id, need, model)
        if admission.reservation is not None:
            return admission, need
        if admission.refused in ("parallel", "rpm", "tpm", "too_large"):
            raise rate_limited(token, admission, counted)
    if admission.refused in ("tpm", "too_large"):
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


def _count_may_fit(admission: Admission, body: dict[str, Any], cap: int) -> bool:
    """Whether the prompt's exact count could fit where its byte bound did not: the request counts at least
    one prompt token plus its completions, so a minute with less room left is not worth a ``/tokenize``."""
    spent = (admission.current or 0) if admission.refused == "tpm" else 0
    return (admission.limit or 0) - spent >= 1 + max(cap, 0) * choices(body)


def limit_headers(admission: Admission) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the request and token windows that apply (none: no headers)."""
    headers = {}
    for kind, window in (("requests", admission.requests), ("tokens", admission.tokens)):
        if window is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(window.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(window.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = f"{window.reset}s"
    return headers


def rate_limited(token: TokenOut, admission: Admission, counted: int | None = None) -> GatewayError:
    """OpenAI's 429 for a rate limit: the error, ``retry-after`` and the ``x-ratelimit-*`` headers."""
    wait = admission.retry_after or 1
    who = f"token '{token.name}'" + (f" and model '{admission.model}'" if admission.model else "")
    limit, used, requested = admission.limit, admission.current, admission.requested
    basis = (f"its prompt of {counted} tokens, as the channel's tokenizer counts it, plus max_tokens"
             if counted is not None else "the prompt's upper bound from its bytes, plus max_tokens")
    if admission.refused == "too_large":  # waiting does not help: not retried
        return GatewayError(429, f"Request too large for {who} on tokens per min (TPM): Limit {limit}, Requested "
                            f"{requested} ({basis}). Lower max_tokens or shorten the prompt, or ask the gateway "
                            "admin to raise the limit.", "tokens", "rate_limit_exceeded", headers=limit_headers(admission))
    if admission.refused == "rpm":
        kind = "requests"
        message = (f"Rate limit reached for {who} on requests per min (RPM): Limit {limit}, Used {used}, "
                   f"Requested 1. Please try again in {wait}s.")
    elif admission.refused == "tpm":
        kind = "tokens"
        message = (f"Rate limit reached for {who} on tokens per min (TPM): Limit {limit}, Used {used}, Requested "
                   f"{requested} ({basis}). Please try again in {wait}s, or lower max_tokens.")
    else:
        kind = "requests"
        message = (f"Rate limit reached for {who} on requests in flight: Limit {limit}, "
                   f"In flight {used}. Please try again when one of them has finished.")
    return GatewayError(429, message, kind, "rate_limit_exceeded",
                        headers={"retry-after": str(wait), "x-should-retry": "true", **limit_headers(admission)})


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
    limits: dict[str, str] = {}
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
        own = (token.model_limits or {}).get(model)
        if own is not None or any(v is not None for v in (token.quota, token.lifetime_cap, token.rpm_limit,
                                                          token.tpm_limit, token.max_parallel)):
            counted = (any(v is not None for v in (token.quota, token.lifetime_cap, token.tpm_limit))
                       or (own is not None and own.tpm is not None))
            bound = await off_loop_if_large(len(raw), worst_case, body, cap) if counted else None
            admission, need = await reserve(request, token, path, body, cap, candidates, bound, model)
            if admission is not None:
                rid, limits = admission.reservation, limit_headers(admission)
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
        limits=limits, started=arrived, started_wall=started,
    )
    return Relay(call, candidates, router=state.router, reservations=state.reservations, client=state.client,
                 settings=state.settings, metrics=state.metrics)
