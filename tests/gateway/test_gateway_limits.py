"""Rate limits per token and per model: requests and tokens per minute, requests in flight, exact across
gateway processes.

The store's decision is one transaction (a conditional UPDATE of the token's row and conditional
upserts of the minute's rows); the parallel tests fire requests at two (or four) gateway processes
sharing one database (SQLite file, or PostgreSQL) and count the answers and the backend's own calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from helpers.gateway import PG_URL, GatewayProcess, chat_body, fire_chats, pg_schema_url, wait_for
from llama_lab.gateway import Gateway
from llama_lab.gateway.schemas import ModelLimit, TokenIn
from llama_lab.gateway.store import Store, Window

needs_pg = pytest.mark.skipif(not PG_URL, reason="set LLAMA_LAB_TEST_PG_URL (see .ci/postgres.sh)")


def _entry(token_id: int) -> dict:
    return {"time": 0.0, "token_id": token_id, "token_name": "t", "channel_id": None, "channel_name": None,
            "model": "m", "prompt_tokens": 1, "completion_tokens": 1, "latency_ms": 1.0, "first_byte_ms": None,
            "status": 200, "stream": False, "error": None}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=[needs_pg, pytest.mark.postgres])])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gw.db'}"
    else:
        with pg_schema_url() as url:
            yield url


@pytest.fixture()
def store(db_url):
    s = Store(db_url)
    yield s
    s.close()


def test_requests_in_flight_are_limited_and_released_by_settle_and_expiry(store):
    token = store.create_token(TokenIn(name="t", max_parallel=2, quota=1000))
    first, second = store.admit(token.id, 10, ttl=60), store.admit(token.id, 10, ttl=60)
    assert first.reservation and second.reservation
    third = store.admit(token.id, 10, ttl=60)
    assert (third.reservation, third.refused, third.limit, third.current) == (None, "parallel", 2, 2)
    assert store.quota_state(token.id) == (0, 20, 1000)  # the refused one held nothing
    store.settle(_entry(token.id), first.reservation)
    assert store.get_token(token.id).in_flight == 1
    gone = store.admit(token.id, 10, ttl=-1)  # its gateway "died": the sweep releases its place
    assert gone.reservation and store.get_token(token.id).in_flight == 2
    assert store.expire_reservations() == 1 and store.get_token(token.id).in_flight == 1
    assert store.admit(token.id, 10, ttl=60).reservation
    # a token without a quota holds nothing but still counts in flight
    free = store.create_token(TokenIn(name="u", max_parallel=1))
    assert store.admit(free.id, 0, ttl=60).reservation and store.admit(free.id, 0, ttl=60).refused == "parallel"


def test_requests_per_minute_count_calendar_minutes(store):
    token = store.create_token(TokenIn(name="t", rpm_limit=3))
    start = 1_800_000_000.0 + 15  # 15 s into a minute
    for i in range(3):
        admitted = store.admit(token.id, 0, ttl=60, now=start + i)
        assert admitted.reservation
        store.settle(_entry(token.id), admitted.reservation)
    refused = store.admit(token.id, 0, ttl=60, now=start + 5)
    assert (refused.refused, refused.limit, refused.retry_after) == ("rpm", 3, 40)
    assert store.get_token(token.id).in_flight == 0  # the refusal rolled its place back
    assert store.admit(token.id, 0, ttl=60, now=start + 45).reservation  # the next minute
    # a quota refusal does not count against the minute
    tight = store.create_token(TokenIn(name="q", rpm_limit=1, quota=5))
    assert store.admit(tight.id, 50, ttl=60, now=start).refused == "quota"
    assert store.admit(tight.id, 5, ttl=60, now=start).reservation


START = 1_800_000_000.0 + 15  # 15 s into a calendar minute


def test_tokens_per_minute_count_the_worst_case_then_the_real_usage(store):
    token = store.create_token(TokenIn(name="t", tpm_limit=100, rpm_limit=10, quota=10_000))
    first = store.admit(token.id, 60, ttl=60, now=START)
    assert first.reservation and first.tokens == Window(limit=100, remaining=40, reset=45)
    assert first.requests == Window(limit=10, remaining=9, reset=45)
    refused = store.admit(token.id, 50, ttl=60, now=START + 1)
    assert (refused.refused, refused.limit, refused.current, refused.requested, refused.retry_after) == \
        ("tpm", 100, 60, 50, 44)
    t = store.get_token(token.id)
    assert (t.in_flight, store.quota_state(token.id)) == (1, (0, 60, 10_000))  # the refusal held nothing
    # settled in the same minute: the window keeps the real usage (10), not the worst case (60)
    store.settle({**_entry(token.id), "prompt_tokens": 4, "completion_tokens": 6}, first.reservation, now=START + 2)
    second = store.admit(token.id, 50, ttl=60, now=START + 3)
    assert second.reservation and second.tokens.remaining == 40
    assert store.admit(token.id, 101, ttl=60, now=START + 3).refused == "too_large"  # fits no minute
    # settled in a later minute: the admitting minute keeps the worst case, the new minute starts empty
    store.settle({**_entry(token.id), "prompt_tokens": 1, "completion_tokens": 1}, second.reservation, now=START + 50)
    late = store.admit(token.id, 41, ttl=60, now=START + 40)
    assert (late.refused, late.current) == ("tpm", 60)
    assert store.admit(token.id, 100, ttl=60, now=START + 60).reservation
    # a request that fails before any usage gives its worst case back to the minute
    failed = store.admit(token.id, 0 + 30, ttl=60, now=START + 120)
    store.settle({**_entry(token.id), "prompt_tokens": 0, "completion_tokens": 0}, failed.reservation, now=START + 121)
    assert store.admit(token.id, 100, ttl=60, now=START + 122).tokens.remaining == 0


def test_model_limits_apply_on_top_of_the_tokens(store):
    limits = {"a": ModelLimit(rpm=2), "b": ModelLimit(tpm=50)}
    token = store.create_token(TokenIn(name="t", rpm_limit=6, model_limits=limits))
    assert store.get_token(token.id).model_limits == limits
    a = [store.admit(token.id, 0, ttl=60, now=START, model="a") for _ in range(3)]
    assert a[0].reservation and a[1].reservation
    assert a[0].requests == Window(limit=2, remaining=1, reset=45)  # the tighter of the token's and the model's
    assert (a[2].refused, a[2].model, a[2].limit, a[2].current) == ("rpm", "a", 2, 2)
    assert store.admit(token.id, 0, ttl=60, now=START, model="c").reservation  # no limit of its own
    b = store.admit(token.id, 40, ttl=60, now=START, model="b")
    assert b.reservation and b.tokens == Window(limit=50, remaining=10, reset=45)
    over = store.admit(token.id, 20, ttl=60, now=START, model="b")
    assert (over.refused, over.model, over.limit, over.current, over.requested) == ("tpm", "b", 50, 40, 20)
    store.settle({**_entry(token.id), "prompt_tokens": 5, "completion_tokens": 5}, b.reservation, now=START + 1)
    assert store.admit(token.id, 40, ttl=60, now=START + 2, model="b").reservation  # 10 real + 40 <= 50
    # the token's own rpm counts every model's requests (a, a, c, b, b): one more, then refused
    assert store.admit(token.id, 0, ttl=60, now=START + 3, model="c").reservation
    refused = store.admit(token.id, 0, ttl=60, now=START + 3, model="c")
    assert (refused.refused, refused.model, refused.limit) == ("rpm", None, 6)
    assert store.get_token(token.id).in_flight == 5  # six admitted, one settled; the refusals held no place
    assert store.admit(token.id, 0, ttl=60, now=START + 60, model="a").reservation  # a new minute


def test_an_older_database_gets_the_window_columns(db_url):
    """A database from before tokens per minute: the new columns are added, the new limits work at once."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    with engine.begin() as conn:
        key = "SERIAL PRIMARY KEY" if conn.dialect.name == "postgresql" else "INTEGER PRIMARY KEY"
        conn.execute(text("CREATE TABLE rate_windows (token_id INTEGER NOT NULL, minute BIGINT NOT NULL, "
                          "requests INTEGER NOT NULL, PRIMARY KEY (token_id, minute))"))
        conn.execute(text(f"CREATE TABLE reservations (id {key}, token_id INTEGER NOT NULL, amount BIGINT NOT NULL, "
                          "expires_at FLOAT NOT NULL, created_at FLOAT NOT NULL)"))
        conn.execute(text("INSERT INTO rate_windows VALUES (1, 5, 3)"))
    engine.dispose()
    store = Store(db_url)
    try:
        token = store.create_token(TokenIn(name="t", tpm_limit=10, model_limits={"m": ModelLimit(tpm=5)}))
        first = store.admit(token.id, 4, ttl=60, now=START, model="m")
        assert first.reservation and store.admit(token.id, 4, ttl=60, now=START, model="m").refused == "tpm"
        store.settle(_entry(token.id), first.reservation, now=START)
        assert store.admit(token.id, 3, ttl=60, now=START, model="m").reservation
    finally:
        store.close()


def _gateways(db: str, n: int) -> list[GatewayProcess]:
    gateways = [GatewayProcess(db) for _ in range(n)]
    for g in gateways:
        g.spawn()
    for g in gateways:
        g.wait_ready()
    return gateways


def _inside_one_minute(seconds: float) -> None:
    """Wait for the next calendar minute unless ``seconds`` are left in this one (a burst and its settling)."""
    if time.time() % 60 > 60 - seconds:
        time.sleep(61 - time.time() % 60)


@contextlib.contextmanager
def _sampling(read: Callable[[], int]) -> Iterator[list[int]]:
    """``read()`` as often as it answers while the block runs: the most a limit ever let through at once."""
    seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.append(read())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        stop.set()
        sampler.join()


def _window_tokens(db: str, token_id: int) -> int:
    """The tokens a token's minute windows hold, read straight from the shared database."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT COALESCE(SUM(tokens), 0) FROM rate_windows WHERE token_id = :id"),
                                    {"id": token_id}).scalar())
    finally:
        engine.dispose()


def _limits_across_gateways(backend, db: str, n: int) -> None:
    gateways = _gateways(db, n)
    urls = [g.url for g in gateways]
    try:
        with Gateway(gateways[0].url, gateways[0].admin_key) as admin:
            admin.add_channel("b", backend.url, models=[backend.model])
            admin.add_channel("alias", backend.url, models=["alias"], model_mapping={"alias": backend.model})
            rpm = admin.add_token("rpm", rpm_limit=7)
            _inside_one_minute(20)
            calls = backend.chat_calls()
            responses = asyncio.run(fire_chats(urls, rpm.key, [chat_body(backend.model, 2)] * 30))
            statuses = [r.status_code for r in responses]
            assert statuses.count(200) == 7 and statuses.count(429) == 23, statuses
            assert backend.chat_calls() - calls == 7
            refused = next(r for r in responses if r.status_code == 429)
            assert refused.json()["error"]["code"] == "rate_limit_exceeded" and refused.json()["error"]["type"] == "requests"
            assert 1 <= int(refused.headers["retry-after"]) <= 60 and refused.headers["x-should-retry"] == "true"
            assert refused.headers["x-ratelimit-limit-requests"] == "7"
            assert refused.headers["x-ratelimit-remaining-requests"] == "0"

            # Tokens per minute: each request counts its worst case while in flight, its real usage once
            # settled; the minute's tokens never pass the limit, and end as the sum of the real usages.
            tpm = admin.add_token("tpm", tpm_limit=200)
            _inside_one_minute(25)
            calls = backend.chat_calls()
            with _sampling(lambda: _window_tokens(db, tpm.id)) as window:
                responses = asyncio.run(fire_chats(urls, tpm.key, [chat_body(backend.model, 4)] * 30))
            statuses = [r.status_code for r in responses]
            assert set(statuses) == {200, 429}, statuses
            assert backend.chat_calls() - calls == statuses.count(200)
            logs = wait_for(lambda: (rows := admin.logs(token_id=tpm.id, limit=100)) and len(rows) == 30 and rows)
            spent = sum(r.total_tokens for r in logs)
            assert 0 < spent <= 200 and spent == sum(r.total_tokens for r in logs if r.status == 200)
            assert max(window) <= 200, window
            assert wait_for(lambda: _window_tokens(db, tpm.id) == spent), (_window_tokens(db, tpm.id), spent)
            refused = next(r for r in responses if r.status_code == 429)
            assert refused.json()["error"]["type"] == "tokens" and "tokens per min (TPM): Limit 200" in \
                refused.json()["error"]["message"]
            assert refused.headers["x-ratelimit-limit-tokens"] == "200" and 1 <= int(refused.headers["retry-after"]) <= 60
            assert int(refused.headers["x-ratelimit-remaining-tokens"]) < 200
            assert refused.headers["x-ratelimit-reset-tokens"].endswith("s")
            answered = next(r for r in responses if r.status_code == 200)
            assert answered.headers["x-ratelimit-limit-tokens"] == "200"

            # A limit of one model refuses that model and lets another through on the same token.
            per_model = admin.add_token("per-model", model_limits={backend.model: {"rpm": 3}})
            _inside_one_minute(20)
            calls = backend.chat_calls()
            bodies = [chat_body(backend.model, 2), chat_body("alias", 2)] * 10
            responses = asyncio.run(fire_chats(urls, per_model.key, bodies))
            limited = [r for r, b in zip(responses, bodies) if b["model"] == backend.model]
            assert sorted(r.status_code for r in limited) == [200] * 3 + [429] * 7
            assert [r.status_code for r, b in zip(responses, bodies) if b["model"] == "alias"] == [200] * 10
            assert backend.chat_calls() - calls == 13
            refused = next(r for r in limited if r.status_code == 429)
            assert f"model '{backend.model}'" in refused.json()["error"]["message"]
            assert refused.headers["x-ratelimit-limit-requests"] == "3"

            parallel = admin.add_token("parallel", max_parallel=3)
            with _sampling(lambda: admin.token(parallel.id).in_flight) as seen:
                responses = asyncio.run(fire_chats(urls, parallel.key, [chat_body(backend.model, 48)] * 16))
            statuses = [r.status_code for r in responses]
            assert 3 <= statuses.count(200) and statuses.count(429) >= 1, statuses
            assert max(seen) <= 3 and max(seen) >= 1, seen
            assert wait_for(lambda: admin.token(parallel.id).in_flight == 0)
    finally:
        for g in gateways:
            g.stop()


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_limits_hold_across_two_gateways_on_sqlite(backend, tmp_path):
    _limits_across_gateways(backend, f"sqlite:///{tmp_path / 'gw.db'}", 2)


@needs_pg
@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(360)
@pytest.mark.parametrize("n", [2, 4])
def test_limits_hold_across_gateways_on_postgres(backend, n):
    with pg_schema_url() as url:
        _limits_across_gateways(backend, url, n)


def test_a_budget_period_resets_used_once_and_the_lifetime_cap_holds(store):
    from datetime import datetime, timezone

    def at(day: int, hour: int) -> float:
        return datetime(2026, 12, day, hour, tzinfo=timezone.utc).timestamp()

    token = store.create_token(TokenIn(name="t", quota=100, budget_period="daily", lifetime_cap=150))
    first = store.admit(token.id, 50, ttl=60, now=at(3, 10))
    store.settle({**_entry(token.id), "prompt_tokens": 20, "completion_tokens": 30}, first.reservation)
    assert store.admit(token.id, 60, ttl=60, now=at(3, 23)).refused == "quota"  # 50 + 60 > 100 today
    # the next day: used starts again at 0, exactly once however many requests arrive together
    admitted = [store.admit(token.id, 10, ttl=60, now=at(4, 0) + 5) for _ in range(3)]
    assert all(a.reservation for a in admitted)
    for a in admitted:
        store.settle({**_entry(token.id), "prompt_tokens": 5, "completion_tokens": 5}, a.reservation)
    t = store.get_token(token.id)
    assert (t.used, t.used_total, t.period_start) == (30, 80, at(4, 0))
    # the lifetime cap counts every period: 80 used, 71 more would pass the day's quota but not the cap
    refused = store.admit(token.id, 71, ttl=60, now=at(5, 9))
    assert (refused.refused, refused.limit, refused.current) == ("lifetime", 150, 80)
    assert store.admit(token.id, 70, ttl=60, now=at(5, 9)).reservation
    assert store.get_token(token.id).next_reset_at is not None


def test_budget_flags_and_the_next_reset_through_the_cli(tmp_path):
    import json
    import subprocess
    import sys

    from helpers.cli import ROOT
    from helpers.gateway import ADMIN_KEY
    from llama_lab.gateway import serve_gateway

    gateway = serve_gateway(port=0, db=f"sqlite:///{tmp_path / 'gw.db'}", admin_key=ADMIN_KEY)
    try:
        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "llama_lab", "gateway", "token", *args, "--url", gateway.url,
                                   "--admin-key", ADMIN_KEY], cwd=ROOT, capture_output=True, text=True, timeout=120)

        made = cli("add", "bob", "--quota", "1000", "--period", "weekly", "--lifetime-cap", "50000", "--rpm", "30",
                   "--max-parallel", "2", "--json")
        assert made.returncode == 0, made.stderr
        token = json.loads(made.stdout)
        assert (token["budget_period"], token["lifetime_cap"], token["rpm_limit"], token["max_parallel"]) == \
            ("weekly", 50000, 30, 2)
        assert time.time() < token["next_reset_at"] <= time.time() + 7 * 86400
        bad = cli("add", "eve", "--period", "hourly")
        assert bad.returncode != 0 and "period" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        gateway.stop()


@pytest.fixture()
def gateway(tmp_path):
    from helpers.gateway import ADMIN_KEY
    from llama_lab.gateway import serve_gateway

    handle = serve_gateway(port=0, db=f"sqlite:///{tmp_path / 'gw.db'}", admin_key=ADMIN_KEY, channel_cache_ttl=0)
    yield handle
    handle.stop()


def _post(gateway, key: str, body: dict) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"},
                      timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_answers_carry_the_rate_limit_headers_streamed_or_not(gateway, backend):
    from llama_lab.gateway.quota import worst_case

    with gateway.admin() as admin:
        admin.add_channel("b", backend.url, models=[backend.model])
        token = admin.add_token("t", rpm_limit=50, tpm_limit=10_000, model_limits={backend.model: {"rpm": 20}})
        plain = admin.add_token("plain", quota=10**6)
        body = chat_body(backend.model, 4)
        _inside_one_minute(15)
        first = _post(gateway, token.key, body)
        assert first.status_code == 200
        # the tighter requests window is the model's (20 - 1 left, against the token's 50 - 1)
        assert (first.headers["x-ratelimit-limit-requests"], first.headers["x-ratelimit-remaining-requests"]) == ("20", "19")
        assert first.headers["x-ratelimit-limit-tokens"] == "10000"
        assert int(first.headers["x-ratelimit-remaining-tokens"]) == 10_000 - worst_case(body, 4)  # held while it runs
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
            assert first.headers[name].endswith("s") and 1 <= int(first.headers[name][:-1]) <= 60
        assert wait_for(lambda: len(admin.logs(token_id=token.id)) == 1)  # settled: the real usage replaces the worst case
        streamed = _post(gateway, token.key, chat_body(backend.model, 4, stream=True))
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        assert streamed.headers["x-ratelimit-remaining-requests"] == "18"
        used = first.json()["usage"]["total_tokens"]
        assert int(streamed.headers["x-ratelimit-remaining-tokens"]) == 10_000 - used - worst_case(body, 4)
        unlimited = _post(gateway, plain.key, body)  # a quota is not a rate limit: no such headers
        assert unlimited.status_code == 200 and not any(h.startswith("x-ratelimit") for h in unlimited.headers)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_tokens_per_minute_use_the_exact_prompt_count_when_the_byte_bound_does_not_fit(gateway, backend):
    from llama_lab.gateway.quota import worst_case

    with gateway.admin() as admin:
        admin.add_channel("b", backend.url, models=[backend.model])
        body = chat_body(backend.model, 4)
        token = admin.add_token("t", tpm_limit=60)
        assert worst_case(body, 4) > 60  # the byte bound alone would refuse every request
        _inside_one_minute(15)
        first = _post(gateway, token.key, body)
        assert first.status_code == 200, first.text
        usage = first.json()["usage"]
        used, need = usage["total_tokens"], usage["prompt_tokens"] + 4  # the exact count, plus max_tokens
        assert 60 < used + need and int(first.headers["x-ratelimit-remaining-tokens"]) == 60 - need
        assert wait_for(lambda: len(admin.logs(token_id=token.id)) == 1)
        second = _post(gateway, token.key, body)
        assert second.status_code == 429 and second.headers["x-should-retry"] == "true"
        error = second.json()["error"]
        assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
        assert f"Limit 60, Used {used}, Requested {need}" in error["message"]
        assert "as the channel's tokenizer counts it" in error["message"]
        huge = _post(gateway, token.key, chat_body(backend.model, 100))  # more than any minute holds: not retried
        assert huge.status_code == 429 and huge.headers["x-should-retry"] == "false" and "retry-after" not in huge.headers
        assert huge.json()["error"]["message"].startswith("Request too large for token 't' on tokens per min (TPM)")
        assert huge.headers["x-ratelimit-limit-tokens"] == "60"


def test_bad_limits_get_a_400_that_names_the_field(gateway):
    from helpers.gateway import ADMIN_KEY

    api, headers = gateway.url + "/api/tokens", {"authorization": f"Bearer {ADMIN_KEY}"}
    for bad, words in (({"tpm_limit": -1}, "tpm_limit"), ({"tpm_limit": 0}, "greater than or equal to 1"),
                       ({"model_limits": {"m": {"rpm": 5, "burst": 3}}}, "burst"),
                       ({"model_limits": {"m": {}}}, "give rpm, tpm or both"),
                       ({"model_limits": {"m": {"tpm": -5}}}, "model_limits.m.tpm"),
                       ({"model_limits": ["m"]}, "model_limits"), ({"tokens_per_minute": 5}, "tokens_per_minute")):
        resp = httpx.post(api, json={"name": "x", **bad}, headers=headers)
        assert resp.status_code == 400 and words in resp.json()["error"]["message"], (bad, resp.text)
    made = httpx.post(api, json={"name": "ok", "tpm_limit": 100}, headers=headers).json()
    patched = httpx.patch(f"{api}/{made['id']}", json={"tpm_limit": -3}, headers=headers)
    assert patched.status_code == 400 and "tpm_limit" in patched.json()["error"]["message"]
    cleared = httpx.patch(f"{api}/{made['id']}", json={"tpm_limit": None, "model_limits": {}}, headers=headers).json()
    assert (cleared["tpm_limit"], cleared["model_limits"]) == (None, None)


def test_tpm_and_model_limit_flags_through_the_cli(gateway):
    import json
    import subprocess
    import sys

    from helpers.cli import ROOT
    from helpers.gateway import ADMIN_KEY

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llama_lab", "gateway", "token", *args, "--url", gateway.url,
                               "--admin-key", ADMIN_KEY], cwd=ROOT, capture_output=True, text=True, timeout=120)

    made = cli("add", "bob", "--tpm", "5000", "--model-limit", "m=rpm:5,tpm:1000", "--model-limit", "llama3:8b=rpm:2",
               "--json")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)
    assert token["tpm_limit"] == 5000
    assert token["model_limits"] == {"m": {"rpm": 5, "tpm": 1000}, "llama3:8b": {"rpm": 2, "tpm": None}}
    listed = cli("list")
    assert listed.returncode == 0 and "tpm_limit" in listed.stdout.splitlines()[0]
    assert "5000" in listed.stdout and "m=rpm:5,tpm:1000; llama3:8b=rpm:2" in listed.stdout
    cleared = cli("update", str(token["id"]), "--no-model-limits", "--no-tpm", "--json")
    assert cleared.returncode == 0 and json.loads(cleared.stdout)["model_limits"] is None
    for args, code, words in ((["--tpm", "-5"], 1, "invalid value for --tpm: "),
                              (["--model-limit", "m=rpm:0"], 1, "invalid value for --model-limit (m.rpm): "),
                              (["--model-limit", "m"], 2, "--model-limit: want MODEL=rpm:N,tpm:M")):
        bad = cli("add", "eve", *args)
        assert bad.returncode == code and words in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_a_huge_max_tokens_is_refused_not_a_server_error(gateway):
    with gateway.admin() as admin:
        quota, tpm = admin.add_token("q", quota=1000), admin.add_token("t", tpm_limit=1000)
    body = chat_body("m", 10**20)
    assert _post(gateway, quota.key, body).json()["error"]["code"] == "insufficient_quota"
    refused = _post(gateway, tpm.key, body)
    assert refused.status_code == 429 and "Request too large" in refused.json()["error"]["message"]
