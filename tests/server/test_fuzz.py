"""Fuzz the server's own OpenAPI schema with schemathesis: no 5xx, every error OpenAI-shaped, healthy after.

The server runs the tiny random model. Generation stays cheap: every admitted ``max_tokens`` /
``max_completion_tokens`` / ``n`` is folded into a small range (values the schema refuses are left
alone, so they still probe validation) and requests without ``max_tokens`` get 2 tokens. Each
operation gets the coverage phase (boundary values of every field, wrong types, missing fields,
unexpected methods) and a bounded number of random examples, with a fixed seed.

The first runs found a sampler bug: admitted ``temperature`` / ``top_p`` / ``repetition_penalty``
values below float32's range (``5e-324``) gave 500 "probability tensor contains either `inf`, `nan`
or element < 0". The batched sampler keeps every admitted value finite; the last test pins it.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from helpers.engine import wait_idle
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig

from llama_lab import serve

FUZZ_EXAMPLES = 10  # random examples per operation, on top of the coverage phase
SMALL = {"max_tokens": 2, "max_completion_tokens": 2, "n": 2}  # admitted values are folded into 1..this
VOCAB = 49152  # the tiny model's tokenizer (SmolLM2's); checked against the server below


@pytest.fixture(scope="module")
def fuzzed_server(tiny_engine):
    assert len(tiny_engine.loaded.tokenizer) == VOCAB
    with serve(tiny_engine, port=0, default_max_tokens=2, log_level="error") as server:
        yield server
    wait_idle(tiny_engine)


def _openapi() -> dict[str, Any]:
    """The server's OpenAPI document, from its routes alone (no model needed at collection time)."""
    from fastapi import FastAPI

    from llama_lab.server.routes import router

    app = FastAPI(title="llama_lab")
    app.include_router(router)
    return app.openapi()


CONFIG = SchemathesisConfig.from_dict({
    "seed": 10,
    "generation": {"max-examples": FUZZ_EXAMPLES, "database": "none"},
    "phases": {"examples": {"enabled": False}, "stateful": {"enabled": False}},
    "request-timeout": 60,
})
schema = schemathesis.openapi.from_dict(_openapi(), config=CONFIG)


@schema.hook("map_body")
def small_generation(context: Any, body: Any) -> Any:
    """Fold admitted max_tokens / n into 1..SMALL; values the schema refuses are left to probe validation."""
    if isinstance(body, dict):
        for field, top in SMALL.items():
            value = body.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                body[field] = (value - 1) % top + 1
    return body


@schema.hook("map_case")
def valid_means_valid(context: Any, case: Any) -> Any:
    """Give positive cases what the schema cannot say, so they reach the engine instead of a 400.

    Rules across fields: a non-assistant message needs content; top_logprobs needs logprobs;
    prompts and inputs are non-empty and their token ids exist. Negative cases stay as generated.
    (At most 2 prompts per request, like the small max_tokens: a cost bound, not a validity rule.)
    """
    meta, body = case.meta, case.body
    if meta is None or meta.generation.mode.is_negative or not isinstance(body, dict):
        return case
    for message in body.get("messages") or []:
        if isinstance(message, dict) and message.get("content") is None and message.get("role") != "assistant":
            message["content"] = "hi"
    if body.get("top_logprobs") and body.get("logprobs") is not True:
        body["logprobs"] = True
    for field in ("prompt", "input"):
        if field in body:
            body[field] = _usable_prompt(body[field])
    return case


def _usable_prompt(value: Any, depth: int = 0) -> Any:
    """Non-empty, ids in the vocabulary, and at most 2 prompts (each one is a generation)."""
    if value in ("", []):
        return "hi"
    if not isinstance(value, list):
        return value
    if depth == 0 and any(isinstance(v, (str, list)) for v in value):
        value = value[:2]
    return [[1] if v == [] else "hi" if v == "" else _usable_prompt(v, depth + 1) if isinstance(v, list) else
            v % VOCAB if isinstance(v, int) and not isinstance(v, bool) else v for v in value]


def openai_shaped_errors(ctx: Any, response: Any, case: Any) -> None:
    """Every error a client can get is ``{"error": {message, type, param, code}}`` JSON."""
    if response.status_code < 400:
        return
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), f"error with content type {content_type!r}"
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error


def test_the_fuzzed_schema_is_the_one_the_server_serves(fuzzed_server):
    served = httpx.get(fuzzed_server.url + "/openapi.json").json()
    fuzzed = _openapi()
    assert served["paths"] == fuzzed["paths"] and served["components"] == fuzzed["components"]


@schema.parametrize()
def test_no_5xx_and_every_error_is_openai_shaped(case, fuzzed_server):
    response = case.call(base_url=fuzzed_server.url)
    case.validate_response(response, checks=[not_a_server_error, openai_shaped_errors],
                           transport_kwargs={"base_url": fuzzed_server.url})


def test_the_server_is_healthy_after_fuzzing(fuzzed_server, tiny_engine):
    wait_idle(tiny_engine)
    with httpx.Client(base_url=fuzzed_server.url, timeout=60) as http:
        assert http.get("/health").json()["status"] == "ok"
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [5e-324, 1e-300])
def test_sampling_values_below_float32_range_are_answered(fuzzed_server, field, value):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    r = httpx.post(fuzzed_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
