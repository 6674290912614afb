"""Rate limits per token: requests per minute and requests in flight, exact across gateway processes.

The store's decision is one transaction (a conditional UPDATE of the token's row and a conditional
upsert of the minute's row); the parallel tests fire requests at two gateway processes sharing one
database (SQLite file, or PostgreSQL) and count the answers and the backend's own calls.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from helpers.gateway import PG_URL, GatewayProcess, chat_body, fire_chats, pg_schema_url, wait_for
from llama_lab.gateway import Gateway
from llama_lab.gateway.schemas import TokenIn
from llama_lab.gateway.store import Store

needs_pg = pytest.mark.skipif(not PG_URL, reason="set LLAMA_LAB_TEST_PG_URL (see .ci/postgres.sh)")


def _entry(token_id: int) -> dict:
    return {"time": 0.0, "token_id": token_id, "token_name": "t", "channel_id": None, "channel_name": None,
            "model": "m", "prompt_tokens": 1, "completion_tokens": 1, "latency_ms": 1.0, "first_byte_ms": None,
            "status": 200, "stream": False, "error": None}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=[needs_pg, pytest.mark.postgres])])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'gw.db'}")
        yield s
        s.close()
    else:
        with pg_schema_url() as url:
            s = Store(url)
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


def _gateways(db: str, n: int) -> list[GatewayProcess]:
    gateways = [GatewayProcess(db) for _ in range(n)]
    for g in gateways:
        g.spawn()
    for g in gateways:
        g.wait_ready()
    return gateways


def _limits_across_gateways(backend, db: str, n: int) -> None:
    gateways = _gateways(db, n)
    try:
        with Gateway(gateways[0].url, gateways[0].admin_key) as admin:
            admin.add_channel("b", backend.url, models=[backend.model])
            rpm = admin.add_token("rpm", rpm_limit=7)
            if time.time() % 60 > 40:  # all of it inside one calendar minute
                time.sleep(61 - time.time() % 60)
            calls = backend.chat_calls()
            responses = asyncio.run(fire_chats([g.url for g in gateways], rpm.key, [chat_body(backend.model, 2)] * 30))
            statuses = [r.status_code for r in responses]
            assert statuses.count(200) == 7 and statuses.count(429) == 23, statuses
            assert backend.chat_calls() - calls == 7
            refused = next(r for r in responses if r.status_code == 429)
            assert refused.json()["error"]["code"] == "rate_limit_exceeded" and refused.json()["error"]["type"] == "requests"
            assert 1 <= int(refused.headers["retry-after"]) <= 60 and refused.headers["x-should-retry"] == "true"
            assert refused.headers["x-ratelimit-limit-requests"] == "7"
            assert refused.headers["x-ratelimit-remaining-requests"] == "0"

            parallel = admin.add_token("parallel", max_parallel=3)
            seen: list[int] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    seen.append(admin.token(parallel.id).in_flight)
                    time.sleep(0.01)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                responses = asyncio.run(fire_chats([g.url for g in gateways], parallel.key,
                                              [chat_body(backend.model, 48)] * 16))
            finally:
                stop.set()
                sampler.join()
            statuses = [r.status_code for r in responses]
            assert 3 <= statuses.count(200) and statuses.count(429) >= 1, statuses
            assert max(seen) <= 3 and max(seen) >= 1, seen
            assert wait_for(lambda: admin.token(parallel.id).in_flight == 0)
    finally:
        for g in gateways:
            g.stop()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_limits_hold_across_two_gateways_on_sqlite(backend, tmp_path):
    _limits_across_gateways(backend, f"sqlite:///{tmp_path / 'gw.db'}", 2)


@needs_pg
@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(240)
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
