"""Two gateway processes' worth of state on one real PostgreSQL (LLAMA_LAB_TEST_PG_URL)."""

from __future__ import annotations

import threading

import httpx
import pytest

from helpers.gateway import ADMIN_KEY, PG_URL, chat_body, logged_tokens, pg_schema_url, wait_for
from llama_lab.gateway import serve_gateway
from llama_lab.gateway.schemas import TokenIn
from llama_lab.gateway.store import Store

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not PG_URL, reason="set LLAMA_LAB_TEST_PG_URL (see .ci/postgres.sh)"),
]


@pytest.fixture()
def pg_url():
    """A fresh schema per test, so tests never see each other's rows."""
    with pg_schema_url() as url:
        yield url


def _log(token_id: int) -> dict:
    return {"time": 0.0, "token_id": token_id, "token_name": "t", "channel_id": None, "channel_name": None, "model": "m",
            "prompt_tokens": 2, "completion_tokens": 3, "latency_ms": 1.0, "first_byte_ms": None, "status": 200,
            "stream": False, "error": None}


def test_store_settle_is_atomic_on_postgres(pg_url):
    stores = [Store(pg_url), Store(pg_url)]  # two "processes"
    try:
        token = stores[0].create_token(TokenIn(name="race", quota=10**6))
        assert stores[1].token_by_key(token.key).id == token.id
        threads = [threading.Thread(target=lambda s=s: [s.settle(_log(token.id)) for _ in range(40)]) for s in stores * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert stores[1].get_token(token.id).used == 8 * 40 * 5 == logged_tokens(stores[0], token.id)
    finally:
        for s in stores:
            s.close()


@pytest.mark.slow
def test_two_gateways_share_tokens_quota_and_channels(pg_url, backend):
    a = serve_gateway(port=0, db=pg_url, admin_key=ADMIN_KEY, channel_cache_ttl=0.2)
    b = serve_gateway(port=0, db=pg_url, admin_key=ADMIN_KEY, channel_cache_ttl=0.2)
    try:
        with a.admin() as admin_a, b.admin() as admin_b:
            admin_a.add_channel("shared", backend.url, models=[backend.model])
            token = admin_a.add_token("both", quota=150)
            assert [t.name for t in admin_b.tokens()] == ["both"]
            statuses: list[int] = []

            def one(gw) -> None:
                resp = httpx.post(gw.url + "/v1/chat/completions", json=chat_body(backend.model, 6),
                                  headers={"authorization": f"Bearer {token.key}"}, timeout=120)
                statuses.append(resp.status_code)

            for _wave in range(3):
                threads = [threading.Thread(target=one, args=(gw,)) for gw in (a, b) * 5]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}
            wait_for(lambda: len(admin_b.logs(token_id=token.id, limit=100)) == len(statuses))
            logs = admin_b.logs(token_id=token.id, limit=100)
            assert admin_a.token(token.id).used == sum(r.total_tokens for r in logs) <= 150  # reserved first: never overspent

            admin_b.update_channel(1, enabled=False)  # an edit through one gateway reaches the other
            resp = wait_for(lambda: (r := httpx.post(
                a.url + "/v1/chat/completions", json=chat_body(backend.model),
                headers={"authorization": f"Bearer {admin_a.add_token('x').key}"})).status_code == 503 and r, timeout=5)
            assert resp and "disabled" in resp.json()["error"]["message"]
    finally:
        a.stop()
        b.stop()


def test_nul_characters_get_4xx_not_a_driver_error(pg_url):
    """PostgreSQL text cannot hold NUL: admin input is refused (400), a client's model name is logged safely."""
    gw = serve_gateway(port=0, db=pg_url, admin_key=ADMIN_KEY)
    try:
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        bad = httpx.post(gw.url + "/api/channels", json={"name": "a\x00b", "base_url": "http://x"}, headers=admin)
        assert bad.status_code == 400 and "NUL" in bad.json()["error"]["message"]
        assert httpx.get(gw.url + "/api/logs", params={"model": "m\x00"}, headers=admin).status_code == 400
        key = httpx.post(gw.url + "/api/tokens", json={"name": "t", "quota": 10**6}, headers=admin).json()["key"]
        resp = httpx.post(gw.url + "/v1/chat/completions", json=chat_body("m\x00", 2), headers={"authorization": f"Bearer {key}"})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "model_not_available"
        row = httpx.get(gw.url + "/api/logs", headers=admin).json()[0]
        assert row["status"] == 503 and row["model"] == "m\ufffd"
    finally:
        gw.stop()
