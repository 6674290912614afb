"""Store, accounting and routing logic without any backend (milliseconds each)."""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest

from helpers.gateway import logged_tokens
from llama_lab.gateway.schemas import parse_expiry
from llama_lab.gateway.routing import upstream_url, weighted_order
from llama_lab.gateway.schemas import Channel, ChannelIn, ChannelPatch, TokenIn, TokenPatch
from llama_lab.gateway.store import Store, hash_key


@pytest.fixture()
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'gw.db'}")
    yield s
    s.close()


def _log(token_id: int, prompt: int, completion: int) -> dict:
    return {
        "time": 0.0, "token_id": token_id, "token_name": "t", "channel_id": None, "channel_name": None, "model": "m",
        "prompt_tokens": prompt, "completion_tokens": completion, "latency_ms": 1.0, "first_byte_ms": None,
        "status": 200, "stream": False, "error": None,
    }


def test_token_key_is_shown_once_and_stored_hashed(store, tmp_path):
    created = store.create_token(TokenIn(name="alice", quota=1000))
    assert created.key.startswith("sk-") and len(created.key) == 51
    assert store.token_by_key(created.key).name == "alice"
    assert store.token_by_key(created.key + "x") is None
    raw = (tmp_path / "gw.db").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("gw.db-*"))
    assert created.key.encode() not in raw and hash_key(created.key).encode() in raw
    assert "key" not in store.list_tokens()[0].model_dump()


def test_settle_is_atomic_under_concurrency(store):
    token = store.create_token(TokenIn(name="race", quota=10**9))
    threads = [threading.Thread(target=lambda: [store.settle(_log(token.id, 3, 4)) for _ in range(25)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get_token(token.id).used == 8 * 25 * 7 == logged_tokens(store, token.id)


def test_state_survives_reopen(tmp_path):
    url = f"sqlite:///{tmp_path / 'persist.db'}"
    first = Store(url)
    key = first.create_token(TokenIn(name="bob", quota=50)).key
    first.create_channel(ChannelIn(name="gpu", base_url="http://10.0.0.2:19327", models=["m"]))
    first.settle(_log(1, 5, 5))
    first.close()
    second = Store(url)
    assert second.token_by_key(key).used == 10
    assert [c.name for c in second.channels()] == ["gpu"]
    assert second.engine.connect().exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    second.close()


def test_channel_update_patch_semantics(store):
    ch = store.create_channel(ChannelIn(name="cpu", base_url="http://h:1/v1", api_key="secret", models=["a"], priority=1))
    assert ch.has_api_key and "api_key" not in ch.model_dump()
    store.set_auto_disabled(ch.id, True, "3 failures")
    out = store.update_channel(ch.id, ChannelPatch(weight=5))
    assert (out.weight, out.priority, out.models, out.auto_disabled) == (5, 1, ["a"], True)
    out = store.update_channel(ch.id, ChannelPatch(enabled=True))
    assert not out.auto_disabled and out.disabled_reason is None
    assert store.update_channel(999, ChannelPatch(weight=1)) is None
    assert store.delete_channel(ch.id) and not store.delete_channel(ch.id)


def test_token_patch_can_clear_quota_and_reset_usage(store):
    tok = store.create_token(TokenIn(name="t", quota=10, expires_at=123.0))
    store.settle(_log(tok.id, 6, 6))
    out = store.update_token(tok.id, TokenPatch.model_validate({"quota": None, "expires_at": None, "used": 0}))
    assert (out.quota, out.expires_at, out.used) == (None, None, 0)


def test_logs_filters(store):
    tok = store.create_token(TokenIn(name="t"))
    for status in (200, 200, 429):
        entry = _log(tok.id, 1, 1)
        entry["status"] = status
        store.settle(entry)
    assert len(store.logs()) == 3
    assert [r.status for r in store.logs(status=429)] == [429]
    assert len(store.logs(token_id=tok.id, limit=2)) == 2
    assert store.logs(token_id=tok.id + 1) == []


def _channel(cid: int, priority: int = 0, weight: int = 1) -> Channel:
    return Channel(
        id=cid, name=f"c{cid}", base_url="http://x", api_key=None, has_api_key=False, models=[], model_mapping={},
        priority=priority, weight=weight, enabled=True, auto_disabled=False, disabled_reason=None,
        last_test_at=None, last_test_latency_ms=None, created_at=0.0,
    )


def test_priority_first_then_weight():
    rng = random.Random(0)
    chans = [_channel(1, 0, 1), _channel(2, 0, 3), _channel(3, 5, 1)]
    firsts = Counter()
    for _ in range(4000):
        order = weighted_order(chans, rng)
        assert order[0].id == 3 and len({c.id for c in order}) == 3  # high priority first, no repeats
        firsts[order[1].id] += 1
    assert 0.70 < firsts[2] / 4000 < 0.80  # weight 3 vs 1: first in its priority 75% of the time


def test_weight_zero_is_a_spare():
    rng = random.Random(1)
    assert all(weighted_order([_channel(1, 0, 0), _channel(2, 0, 1)], rng)[0].id == 2 for _ in range(100))


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("http://h:1", "http://h:1/v1/chat/completions"),
        ("http://h:1/", "http://h:1/v1/chat/completions"),
        ("http://h:1/v1", "http://h:1/v1/chat/completions"),
        ("http://h:1/v1/", "http://h:1/v1/chat/completions"),
    ],
)
def test_base_url_with_or_without_v1(base, url):
    assert upstream_url(base, "/chat/completions") == url


def test_channel_serves_and_maps():
    ch = _channel(1).model_copy(update={"models": ["llama"], "model_mapping": {"gpt-4o-mini": "llama"}})
    assert ch.serves("llama") and ch.serves("gpt-4o-mini") and not ch.serves("other")
    assert ch.upstream_model("gpt-4o-mini") == "llama" and ch.upstream_model("llama") == "llama"
    assert _channel(2).serves("anything")


def test_parse_expiry():
    assert parse_expiry("never") is None
    assert parse_expiry("1700000000") == 1700000000.0
    assert abs(parse_expiry("30d") - parse_expiry("720h")) < 5
    assert parse_expiry("2030-01-01") > parse_expiry("2029-12-31")


def test_schema_rejects_bad_input():
    with pytest.raises(ValueError, match="http"):
        ChannelIn(name="x", base_url="127.0.0.1:19327")
    with pytest.raises(ValueError, match="subnet"):
        TokenIn(name="x", subnets=["not-a-net"])


def _open_store_at_barrier(url: str, barrier) -> None:
    barrier.wait(timeout=60)
    Store(url).close()


def test_gateways_opening_a_new_sqlite_file_at_once_all_start(tmp_path):
    """Processes that open one new file together race for WAL and the tables; every one must start
    (the switch to WAL answered "database is locked" at once to the loser, and CI saw a gateway exit on it).
    A race, so 40 rounds: before the fix about half of the runs of this test failed on this 2-core machine."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for round_ in range(40):
        url = f"sqlite:///{tmp_path / f'gw{round_}.db'}"
        barrier = ctx.Barrier(6)
        procs = [ctx.Process(target=_open_store_at_barrier, args=(url, barrier)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=90)
        assert [p.exitcode for p in procs] == [0] * 6, f"round {round_}"


class _LockedCursor:
    """A DB-API cursor whose first ``busy`` journal-mode switches fail as a racing process makes them fail."""

    def __init__(self, busy: int, error: str = "database is locked") -> None:
        self.busy, self.error, self.statements = busy, error, []

    def execute(self, sql: str):
        import sqlite3

        self.statements.append(sql)
        if sql == "PRAGMA journal_mode=WAL" and self.busy:
            self.busy -= 1
            raise sqlite3.OperationalError(self.error)
        return self

    def fetchone(self):
        return ("delete",)


def test_wal_switch_retries_a_locked_file_and_raises_other_errors():
    from llama_lab.gateway.store import _use_wal

    cursor = _LockedCursor(busy=3)
    _use_wal(cursor)
    assert cursor.statements.count("PRAGMA journal_mode=WAL") == 4
    with pytest.raises(Exception, match="disk I/O error"):
        _use_wal(_LockedCursor(busy=1, error="disk I/O error"))
    with pytest.raises(Exception, match="locked"):
        _use_wal(_LockedCursor(busy=10**6), deadline_s=0.2)
