"""Fuzz the gateway's OpenAPI schema (schemathesis): no 5xx, every error OpenAI-shaped, healthy afterwards.

Bounded for CI: a tiny random-weight backend, at most 4 completion tokens and 2 choices per
request, a fixed number of examples per operation (derandomized, so every run sends the same cases).
"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest

from helpers.gateway import ADMIN_KEY, PG_URL, GatewayProcess, chat_body, pg_schema_url
from llama_lab.gateway import Gateway

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (after the skip: hypothesis comes with schemathesis)
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

EXAMPLES = {"/v1/chat/completions": 80, "/v1/completions": 50}  # the rest: DEFAULT_EXAMPLES each
DEFAULT_EXAMPLES = 25


def _bounded(body: object, model: str) -> object:
    """Keep generated chat bodies cheap for the backend: its model, few tokens, few choices."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if isinstance(body.get("model"), str):
        body["model"] = model
    for field, most in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2)):
        if isinstance(body.get(field), int) and not isinstance(body.get(field), bool) and body[field] > most:
            body[field] = most
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 4
    return body


def _problem(response: httpx.Response | object) -> str | None:
    """What is wrong with an answer, or None: a 5xx, or an error that is not OpenAI-shaped."""
    status = response.status_code
    if status >= 500:
        return f"HTTP {status}: {response.text[:300]}"
    if status < 400:
        return None
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status} without an OpenAI error body: {response.text[:300]}"
    if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= set(error):
        return f"HTTP {status} error lacks message/type/param/code: {error}"
    if not isinstance(error["message"], str) or not error["message"]:
        return f"HTTP {status} error without a message: {error}"
    return None


def _fuzz(op, url: str, auth: str, model: str, problems: list[str]) -> Counter:
    """Send one operation's generated cases (valid and invalid); record what is wrong; count the statuses."""
    statuses: Counter = Counter()

    @settings(max_examples=EXAMPLES.get(op.path, DEFAULT_EXAMPLES), deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE)))
    def run(case):
        if op.method.upper() == "POST" and op.path.startswith("/v1/"):
            case.body = _bounded(case.body, model)
        response = case.call(base_url=url, headers={"authorization": f"Bearer {auth}"}, timeout=60)
        statuses[response.status_code] += 1
        problem = _problem(response)
        if problem:
            problems.append(f"{op.method.upper()} {op.path}: {problem}\n    {case.as_curl_command()}")

    run()
    return statuses


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=[
    pytest.mark.postgres, pytest.mark.skipif(not PG_URL, reason="set LLAMA_LAB_TEST_PG_URL (see .ci/postgres.sh)")])])
def db(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gw.db'}"
    else:
        with pg_schema_url() as url:
            yield url


def test_schema_fuzz_finds_no_5xx_and_only_openai_shaped_errors(backend, db):
    gateway = GatewayProcess(db, "--default-max-tokens", "4").start()
    try:
        with Gateway(gateway.url, ADMIN_KEY) as admin:
            admin.add_channel("tiny", backend.url, models=[backend.model])
            key = admin.add_token("fuzz", quota=10**9).key  # limited: every request reserves and settles
        schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
        operations = [r.ok() for r in schema.get_all_operations()]
        # The OpenAI routes first: the admin fuzz may disable or delete the channel they use.
        operations.sort(key=lambda op: op.path.startswith("/api"))
        assert len(operations) >= 14
        problems: list[str] = []
        started = time.monotonic()
        seen = {}
        for op in operations:
            seen[f"{op.method.upper()} {op.path}"] = _fuzz(
                op, gateway.url, ADMIN_KEY if op.path.startswith("/api") else key, backend.model, problems)
        elapsed = time.monotonic() - started
        total = sum(sum(c.values()) for c in seen.values())
        print(f"schemathesis: {total} requests over {len(operations)} operations in {elapsed:.1f} s")
        for name, statuses in seen.items():
            print(f"  {name}: {dict(sorted(statuses.items()))}")
        unique = list(dict.fromkeys(p.split("\n")[0] for p in problems))
        assert not problems, f"{len(problems)} problems, {len(unique)} kinds:\n" + "\n".join(unique[:40])
        # Healthy afterwards: answers /health, and serves a chat through a fresh channel and token.
        assert httpx.get(gateway.url + "/health", timeout=5).json() == {"status": "ok"}
        with Gateway(gateway.url, ADMIN_KEY) as admin:
            for channel in admin.channels():  # the fuzz left channels with made-up addresses
                admin.delete_channel(channel.id)
            admin.add_channel("after", backend.url, models=["after-fuzz"], model_mapping={"after-fuzz": backend.model})
            fresh = admin.add_token("after", quota=10_000).key
        reply = httpx.post(gateway.url + "/v1/chat/completions", json=chat_body("after-fuzz", 2),
                           headers={"authorization": f"Bearer {fresh}"}, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
        assert gateway.alive
    finally:
        gateway.stop()
