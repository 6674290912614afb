"""Quotas that cannot be overspent: reservations before forwarding, settlement after, expiry after a crash.

The parallel tests fire N requests at once through real gateway processes (one on SQLite, two
sharing PostgreSQL) while a thread samples the token's row in the database, and count the
backend's own request counter to prove that refused requests never reached it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from helpers.gateway import (
    PG_URL,
    Backend,
    GatewayProcess,
    QuotaProbe,
    StallingServer,
    chat_body,
    fire_chats,
    free_port,
    logged_tokens,
    pg_schema_url,
    sse_data,
    wait_for,
)
from llama_lab.gateway import Gateway, serve_gateway
from llama_lab.gateway.quota import completion_cap, prompt_upper_bound, worst_case
from llama_lab.gateway.schemas import TokenIn
from llama_lab.gateway.store import Store
from llama_lab.web.errors import APIError

needs_pg = pytest.mark.skipif(not PG_URL, reason="set LLAMA_LAB_TEST_PG_URL (see .ci/postgres.sh)")


# -- the estimate -------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Say hi."}],
    [{"role": "user", "content": "1+1等于几?请用中文详细回答，并解释为什么。"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "🙂🚀 emoji ✨ " * 20},
     {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}],
    [{"role": "user", "content": "def f(x):\n    return {'a': [1, 2, 3]}\n" * 30}],
    [{"role": "user", "content": [{"type": "text", "text": "parts, " * 50}]}],
    [{"role": "user", "content": ""}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_prompt_estimate_bounds_the_real_prompt_tokens(tiny_model, messages):
    """The bytes-based bound is at least what the model's tokenizer and chat template produce."""
    normalized = [{**m, "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]} for m in messages]
    real = len(tiny_model.chat_prompt_ids(normalized))
    bound = prompt_upper_bound({"messages": messages})
    assert real <= bound, f"{real} real prompt tokens > estimate {bound}"


def test_completion_cap_and_worst_case():
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert completion_cap(body) is None
    assert completion_cap({**body, "max_tokens": 8}) == 8
    assert completion_cap({**body, "max_tokens": 8, "max_completion_tokens": 5}) == 5
    assert completion_cap({**body, "max_tokens": "12"}) == 12 and completion_cap({**body, "max_tokens": 7.0}) == 7
    with pytest.raises(APIError, match="max_tokens"):
        completion_cap({**body, "max_tokens": "lots"})
    with pytest.raises(APIError, match="max_tokens"):
        completion_cap({**body, "max_tokens": True})
    one = worst_case(body, 10)
    assert one == prompt_upper_bound(body) + 10
    assert worst_case({**body, "n": 3}, 10) == prompt_upper_bound(body) + 30
    assert worst_case({"prompt": ["a", "b"], "n": 2}, 10) == prompt_upper_bound({"prompt": ["a", "b"]}) + 40
    assert worst_case({"prompt": [1, 2, 3]}, 10) == prompt_upper_bound({"prompt": [1, 2, 3]}) + 10


def _channel(cid: int, url: str):
    from llama_lab.gateway.schemas import Channel

    return Channel(id=cid, name=f"c{cid}", base_url=url, api_key="up-key", models=[], model_mapping={}, priority=0,
                   weight=1, enabled=True, auto_disabled=False, disabled_reason=None, created_at=0.0, has_api_key=True,
                   last_test_at=None, last_test_latency_ms=None)


def test_prompt_counter_asks_tokenize_and_remembers_channels_without_it():
    from llama_lab.gateway.quota import PromptCounter, tokenize_body, tokenize_url

    asked: list[tuple[str, dict, str | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append((str(request.url), json.loads(request.content), request.headers.get("authorization")))
        if request.url.host == "ours":
            return httpx.Response(200, json={"count": 17, "max_model_len": 8192, "tokens": list(range(17))})
        if request.url.host == "llamacpp":  # llama.cpp's /tokenize reads "content": an empty list for our body
            return httpx.Response(200, json={"tokens": []})
        if request.url.host == "down":
            raise httpx.ConnectError("refused")
        return httpx.Response(404, json={"error": "not found"})

    now = [0.0]
    counter = PromptCounter(httpx.AsyncClient(transport=httpx.MockTransport(answer)), retry_s=60, clock=lambda: now[0])
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": None, "max_tokens": 8, "stream": True}

    async def count(channel, path="/chat/completions", b=body):
        return await counter.count(channel, path, b)

    assert asyncio.run(count(_channel(1, "http://ours/v1"))) == 17
    assert asked[-1] == ("http://ours/tokenize", {"messages": body["messages"]}, "Bearer up-key")
    assert asyncio.run(count(_channel(2, "http://llamacpp"))) is None
    assert asyncio.run(count(_channel(3, "http://other/v1/"))) is None
    assert asyncio.run(count(_channel(4, "http://down/v1"))) is None
    n = len(asked)
    for cid, url in ((2, "http://llamacpp"), (3, "http://other/v1/")):  # not asked again within retry_s
        assert asyncio.run(count(_channel(cid, url))) is None
    assert len(asked) == n
    assert asyncio.run(count(_channel(4, "http://down/v1"))) is None and len(asked) == n + 1  # a failure is not remembered
    now[0] = 61.0
    assert asyncio.run(count(_channel(3, "http://other/v1/"))) is None and len(asked) == n + 2
    # what is counted: one prompt; several prompts leave the byte bound in place
    assert asyncio.run(count(_channel(1, "http://ours"), "/completions", {"prompt": "Once"})) == 17
    assert tokenize_body("/completions", {"prompt": [1, 2]}) == {"prompt": [1, 2]}
    assert tokenize_body("/completions", {"prompt": ["a", "b"]}) is None
    assert tokenize_url("http://h:1/v1/") == "http://h:1/tokenize" == tokenize_url("http://h:1")


# -- the store: one conditional UPDATE decides -------------------------------------------------


def _entry(token_id: int, prompt: int, completion: int, status: int = 200) -> dict:
    return {"time": 0.0, "token_id": token_id, "token_name": "t", "channel_id": None, "channel_name": None,
            "model": "m", "prompt_tokens": prompt, "completion_tokens": completion, "latency_ms": 1.0,
            "first_byte_ms": None, "status": status, "stream": False, "error": None}


def _reserve_race(stores: list[Store], quota: int, amount: int, attempts: int) -> None:
    token = stores[0].create_token(TokenIn(name="race", quota=quota))
    won: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(attempts)

    def one(store: Store) -> None:
        barrier.wait()
        rid = store.reserve(token.id, amount, ttl=60)
        if rid is not None:
            with lock:
                won.append(rid)

    threads = [threading.Thread(target=one, args=(stores[i % len(stores)],)) for i in range(attempts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == quota // amount  # exactly as many as fit, never one more
    used, reserved, _ = stores[0].quota_state(token.id)
    assert (used, reserved) == (0, len(won) * amount)
    for i, rid in enumerate(won):  # settle each for less than it held: the rest is released
        stores[i % len(stores)].settle(_entry(token.id, 3, 4), rid)
    used, reserved, _ = stores[0].quota_state(token.id)
    assert (used, reserved) == (7 * len(won), 0) and used == logged_tokens(stores[0], token.id)


def test_reservations_are_race_free_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'gw.db'}"
    stores = [Store(url), Store(url)]  # two engines on one file, like two processes
    try:
        _reserve_race(stores, quota=1000, amount=70, attempts=40)
    finally:
        for s in stores:
            s.close()


@needs_pg
@pytest.mark.postgres
def test_reservations_are_race_free_on_postgres():
    with pg_schema_url() as url:
        stores = [Store(url), Store(url)]
        try:
            _reserve_race(stores, quota=1000, amount=70, attempts=40)
        finally:
            for s in stores:
                s.close()


def test_unrenewed_reservations_expire_once(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'gw.db'}")
    try:
        token = store.create_token(TokenIn(name="t", quota=100))
        stale = store.reserve(token.id, 60, ttl=0.2)
        kept = store.reserve(token.id, 40, ttl=0.2)
        assert store.reserve(token.id, 1, ttl=0.2) is None  # full
        time.sleep(0.3)
        store.renew([kept], ttl=60)  # the request behind `kept` is still running
        assert store.expire_reservations() == 1
        assert store.quota_state(token.id) == (0, 40, 100)
        store.settle(_entry(token.id, 0, 0, status=499), stale)  # its settle comes late: nothing released twice
        assert store.quota_state(token.id) == (0, 40, 100)
        store.settle(_entry(token.id, 10, 20), kept)
        assert store.quota_state(token.id) == (30, 0, 100)
    finally:
        store.close()


def test_an_old_database_gets_the_reserved_column(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE tokens (id INTEGER PRIMARY KEY, name VARCHAR(200), key_hash VARCHAR(64), key_hint VARCHAR(32), "
                 "models JSON, expires_at FLOAT, quota BIGINT, used BIGINT, enabled BOOLEAN, subnets JSON, created_at FLOAT)")
    conn.execute("INSERT INTO tokens VALUES (1, 'old', 'h', 'sk-...', '[]', NULL, 100, 30, 1, '[]', 0)")
    conn.commit()
    conn.close()
    store = Store(f"sqlite:///{path}")
    try:
        assert store.quota_state(1) == (30, 0, 100)
        assert store.reserve(1, 70, ttl=5) is not None and store.reserve(1, 1, ttl=5) is None
    finally:
        store.close()


# -- through real gateway processes ------------------------------------------------------------


class Sampler(threading.Thread):
    """Reads (used, reserved, quota) from the database as fast as it can while requests run."""

    def __init__(self, probe: QuotaProbe, token_id: int) -> None:
        super().__init__(daemon=True)
        self.probe, self.token_id = probe, token_id
        self.samples: list[tuple[int, int, int | None]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self.probe.state(self.token_id))
            time.sleep(0.002)


def _parallel_quota_run(backend: Backend, gateways: list[GatewayProcess], db: str, n: int) -> None:
    body = chat_body(backend.model, 8)
    # what a request really costs (the backend's count of its prompt, plus max_tokens): about a quarter of
    # the requests fit in the quota; without reservations all n would pass
    per_request = httpx.post(backend.url + "/tokenize", json={"messages": body["messages"]}).json()["count"] + 8
    quota = per_request * max(2, n // 4)
    with Gateway(gateways[0].url, gateways[0].admin_key) as admin:
        admin.add_channel("b", backend.url, models=[backend.model])
        token = admin.add_token(f"racer-{n}", quota=quota)
        bodies = [chat_body(backend.model, 8, stream=i % 2 == 0) for i in range(n)]
        probe = QuotaProbe(db)
        sampler = Sampler(probe, token.id)
        calls_before = backend.chat_calls()
        sampler.start()
        try:
            responses = asyncio.run(fire_chats([g.url for g in gateways], token.key, bodies))
            logs = wait_for(lambda: len(rows := admin.logs(token_id=token.id, limit=1000)) == n and rows, timeout=30)
        finally:
            sampler.stop.set()
            sampler.join()
        statuses = [r.status_code for r in responses]
        ok, refused = statuses.count(200), statuses.count(429)
        assert ok + refused == n and ok >= 1 and refused >= 1, statuses
        for r in responses:
            if r.status_code == 429:
                error = r.json()["error"]
                assert error["code"] == "insufficient_quota" and "quota" in error["message"]
            elif r.headers["content-type"].startswith("text/event-stream"):
                assert sse_data(r.text)[-1] == "[DONE]"
        calls = backend.chat_calls() - calls_before
        assert calls == ok  # the refused ones never reached the backend
        assert len(sampler.samples) >= 5
        over = [s for s in sampler.samples if s[0] > quota or s[0] + s[1] > quota]
        assert not over, f"quota {quota} overspent while running: {over[:5]}"
        used, reserved, _ = probe.state(token.id)
        peak = max(u + r for u, r, _q in sampler.samples)
        print(f"{n} parallel: {ok} answered, {refused} refused (429); quota {quota}, used {used}, "
              f"peak used+reserved {peak} over {len(sampler.samples)} samples; backend calls {calls}")
        assert reserved == 0 and probe.reservations(token.id) == 0
        assert used == sum(r.total_tokens for r in logs) <= quota
        assert sorted(r.status for r in logs) == sorted(statuses)
        assert all(r.total_tokens == 0 and r.channel_id is None for r in logs if r.status == 429)
        probe.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("n", [20, 50, 100])
def test_parallel_requests_never_overspend_on_sqlite(backend, tmp_path, n):
    db = f"sqlite:///{tmp_path / 'gw.db'}"
    gateway = GatewayProcess(db).start()
    try:
        _parallel_quota_run(backend, [gateway], db, n)
    finally:
        gateway.stop()


@needs_pg
@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("n", [20, 50, 100])
def test_parallel_requests_never_overspend_on_postgres_with_two_gateways(backend, n):
    with pg_schema_url() as db:
        gateways = [GatewayProcess(db).spawn(), GatewayProcess(db).spawn()]
        try:
            for g in gateways:
                g.wait_ready()
            _parallel_quota_run(backend, gateways, db, n)
        finally:
            for g in gateways:
                g.stop()


def _post_in_background(url: str, key: str, body: dict) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(httpx.post(url + "/v1/chat/completions", json=body,
                                      headers={"authorization": f"Bearer {key}"}, timeout=60).status_code)
        except httpx.HTTPError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _crash_and_recover(backend: Backend, db: str, stall: StallingServer, survivor_args: list[str],
                       peer: GatewayProcess | None) -> None:
    """Kill a gateway mid-request: its reservation outlives it, then expires and is released.

    The request waits on a backend that never answers, so it is in flight for as long as the test
    needs, whatever the machine's speed.
    """
    ttl = 1.0
    victim = GatewayProcess(db, "--reservation-ttl", str(ttl)).start()
    probe = QuotaProbe(db)
    try:
        with Gateway(victim.url, victim.admin_key) as admin:
            admin.add_channel("stuck", stall.url, models=["stuck-model"])
            admin.add_channel("b", backend.url, models=[backend.model])
            stuck = {**chat_body("stuck-model", 8), "messages": [{"role": "user", "content": "x" * 1500}]}
            held = worst_case(stuck, 8)
            token = admin.add_token("crash", quota=held + 50)  # room for one such request at a time
        _thread, outcome = _post_in_background(victim.url, token.key, stuck)
        assert wait_for(lambda: probe.state(token.id) == (0, held, held + 50), timeout=10), probe.state(token.id)
        victim.kill()
        assert wait_for(lambda: outcome, timeout=10) and isinstance(outcome[0], httpx.HTTPError)  # the client saw the crash
        assert probe.state(token.id)[1] == held
        if peer is None:
            time.sleep(2 * ttl)
            assert probe.state(token.id)[1] == held  # nobody released it: the only gateway is gone
        survivor = peer or GatewayProcess(db, *survivor_args).start()  # SQLite: the restart
        try:
            started = time.monotonic()
            assert wait_for(lambda: probe.state(token.id)[1] == 0, timeout=10 * ttl), probe.state(token.id)
            released_after = time.monotonic() - started
            assert probe.reservations(token.id) == 0 and probe.state(token.id)[0] == 0  # never charged, never held

            # A live request's reservation is renewed past the ttl, and released when it fails.
            thread, outcome = _post_in_background(survivor.url, token.key, stuck)
            assert wait_for(lambda: probe.reservations(token.id) == 1, timeout=10)
            time.sleep(2.5 * ttl)
            assert probe.state(token.id)[1] == held and probe.reservations(token.id) == 1
            thread.join(30)
            assert outcome == [502]  # the stuck backend's first-byte timeout
            assert wait_for(lambda: probe.state(token.id) == (0, 0, held + 50)), probe.state(token.id)  # settled after the answer

            # The room is back: the same-size request to a real backend fits and is charged its real usage.
            real = {**stuck, "model": backend.model}
            resp = httpx.post(survivor.url + "/v1/chat/completions", json=real,
                              headers={"authorization": f"Bearer {token.key}"}, timeout=60)
            assert resp.status_code == 200, resp.text
            assert wait_for(lambda: probe.state(token.id) == (resp.json()["usage"]["total_tokens"], 0, held + 50))
        finally:
            if peer is None:
                survivor.stop()
        assert released_after < 10 * ttl
    finally:
        victim.stop()
        probe.close()


@pytest.fixture()
def stall():
    server = StallingServer()
    yield server
    server.close()


SURVIVOR_ARGS = ["--reservation-ttl", "1.0", "--first-byte-timeout", "4", "--failure-threshold", "10"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_crashed_gateway_leaves_no_reservation_after_restart_sqlite(backend, stall, tmp_path):
    _crash_and_recover(backend, f"sqlite:///{tmp_path / 'gw.db'}", stall, SURVIVOR_ARGS, peer=None)


@needs_pg
@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_crashed_gateway_reservation_released_by_its_peer_postgres(backend, stall):
    with pg_schema_url() as db:
        peer = GatewayProcess(db, *SURVIVOR_ARGS).start()
        try:
            _crash_and_recover(backend, db, stall, SURVIVOR_ARGS, peer=peer)
        finally:
            peer.stop()


# -- settlement on every way a request ends ----------------------------------------------------


@pytest.fixture()
def gateway(tmp_path):
    handle = serve_gateway(port=0, db=f"sqlite:///{tmp_path / 'gw.db'}", admin_key="k", channel_cache_ttl=0,
                           default_max_tokens=6)
    yield handle
    handle.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_settles_on_disconnect_upstream_failure_and_default_cap(gateway, backend):
    probe = QuotaProbe(gateway.settings.db)
    with gateway.admin() as admin:
        admin.add_channel("b", backend.url, models=[backend.model])
        token = admin.add_token("t", quota=100_000)
        headers = {"authorization": f"Bearer {token.key}"}

        # No max_tokens: the gateway's default cap is reserved and sent upstream.
        body = {"model": backend.model, "messages": [{"role": "user", "content": "hi"}]}
        reply = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=60).json()
        assert reply["usage"]["completion_tokens"] <= 6

        # The client goes away mid-stream: usage so far is charged, the rest released.
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=chat_body(backend.model, 1500, stream=True),
                          headers=headers, timeout=60) as resp:
            lines = resp.iter_lines()
            for _ in range(5):
                next(lines)
            assert probe.state(token.id)[1] == worst_case(chat_body(backend.model, 1500, stream=True), 1500)
        row = wait_for(lambda: (r := admin.logs(token_id=token.id, limit=1)[0]).status == 499 and r)
        assert wait_for(lambda: probe.state(token.id)[1] == 0)

        # Every channel down: nothing charged, everything released.
        admin.add_channel("dead", f"http://127.0.0.1:{free_port()}", models=["dead-model"])
        resp = httpx.post(gateway.url + "/v1/chat/completions", json=chat_body("dead-model", 50), headers=headers)
        assert resp.status_code == 502
        # A model no channel serves: refused after reserving, released in the same transaction.
        assert httpx.post(gateway.url + "/v1/chat/completions", json=chat_body("nope", 50), headers=headers).status_code == 503
        logs = admin.logs(token_id=token.id, limit=100)
        used, reserved, _ = probe.state(token.id)
        assert reserved == 0 and probe.reservations(token.id) == 0
        assert used == sum(r.total_tokens for r in logs) and row.total_tokens > 0
        assert [r.status for r in logs[:2]] == [503, 502]

        # A quota below the byte bound still serves a short request: the channel's /tokenize counts it.
        body = chat_body(backend.model, 8)
        prompt = httpx.post(backend.url + "/tokenize", json={"messages": body["messages"]}).json()["count"]
        assert prompt + 8 <= 60 < worst_case(body, 8)
        sixty = admin.add_token("sixty", quota=60)
        resp = httpx.post(gateway.url + "/v1/chat/completions", json=body,
                          headers={"authorization": f"Bearer {sixty.key}"}, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["prompt_tokens"] == prompt
        total = resp.json()["usage"]["total_tokens"]
        assert wait_for(lambda: probe.state(sixty.id)[:2] == (total, 0))  # settled just after the answer

        # A request that could not fit is refused with the numbers, before any generation.
        small = admin.add_token("small", quota=prompt + 7)
        calls = backend.chat_calls()
        resp = httpx.post(gateway.url + "/v1/chat/completions", json=body,
                          headers={"authorization": f"Bearer {small.key}"})
        message = resp.json()["error"]["message"]
        assert resp.status_code == 429 and "not enough quota left" in message
        assert f"needs {prompt + 8} tokens (its prompt of {prompt} tokens" in message
        assert f"{prompt + 7} of its {prompt + 7}-token quota are free" in message
        assert backend.chat_calls() == calls
        assert json.loads(resp.text)["error"]["type"] == "insufficient_quota"
        unlimited = admin.add_token("free")
        ok = httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(backend.model, 8),
                        headers={"authorization": f"Bearer {unlimited.key}"}, timeout=60)
        assert ok.status_code == 200 and probe.reservations(unlimited.id) == 0  # unlimited: nothing reserved
    probe.close()
