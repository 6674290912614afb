"""Routing inside a priority: weighted, least-busy (across gateway processes) and latency."""

from __future__ import annotations

import random
import time

import httpx
import pytest

from helpers.gateway import ADMIN_KEY, GatewayProcess, chat_body, start_backends, wait_for
from llama_lab.gateway import Gateway
from llama_lab.gateway.routing import routed_order
from llama_lab.gateway.schemas import Channel
from llama_lab.gateway.store import Store


def _channel(cid: int, priority: int = 0, weight: int = 1) -> Channel:
    return Channel(id=cid, name=f"c{cid}", base_url=f"http://c{cid}", api_key=None, models=[], model_mapping={},
                   priority=priority, weight=weight, enabled=True, auto_disabled=False, disabled_reason=None,
                   created_at=0.0, has_api_key=False, last_test_at=None, last_test_latency_ms=None)


def test_routed_order_keeps_priorities_and_sorts_inside_them():
    rng = random.Random(1)
    a, b, c, spare, high = _channel(1), _channel(2), _channel(3), _channel(4, weight=0), _channel(5, priority=9)
    chans = [a, b, c, spare, high]
    busy = routed_order(chans, "least-busy", rng, load={1: 3, 2: 0, 3: 1, 5: 7})
    assert [x.id for x in busy] == [5, 2, 3, 1, 4]  # priority first (however busy), the spare last
    fast = routed_order(chans, "latency", rng, first_byte_ms={1: 40.0, 2: 900.0, 5: 10.0})
    assert [x.id for x in fast] == [5, 3, 1, 2, 4]  # no recent figure (3) goes first: it gets measured
    assert {x.id for x in routed_order(chans, "weighted", rng)} == {1, 2, 3, 4, 5}


def test_latency_comes_from_the_shared_request_log(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'gw.db'}")
    try:
        now = time.time()
        for cid, ms in ((1, 100.0), (1, 300.0), (2, 50.0)):
            store.settle({"time": now, "token_id": None, "token_name": None, "channel_id": cid, "channel_name": "x",
                          "model": "m", "prompt_tokens": 0, "completion_tokens": 0, "latency_ms": ms,
                          "first_byte_ms": ms, "status": 200, "stream": True, "error": None})
        store.settle({"time": now - 600, "token_id": None, "token_name": None, "channel_id": 3, "channel_name": "old",
                      "model": "m", "prompt_tokens": 0, "completion_tokens": 0, "latency_ms": 1.0, "first_byte_ms": 1.0,
                      "status": 200, "stream": True, "error": None})
        assert store.recent_first_byte(now - 300) == {1: 200.0, 2: 50.0}
        assert store.exchange_loads("p1", {1: 2}, fresh_after=now - 5) == {}
        assert store.exchange_loads("p2", {1: 1, 2: 4}, fresh_after=now - 5) == {1: 2}
        assert store.exchange_loads("p1", {}, fresh_after=now - 5) == {1: 1, 2: 4}
        assert store.exchange_loads("p3", {}, fresh_after=time.time() + 1) == {}  # stale rows are ignored
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_least_busy_spreads_load_across_two_gateways(tmp_path):
    backends = start_backends(2)
    db = f"sqlite:///{tmp_path / 'gw.db'}"
    gateways = [GatewayProcess(db, "--routing", "least-busy", "--load-refresh", "0.2") for _ in range(2)]
    try:
        for g in gateways:
            g.start()
        with Gateway(gateways[0].url, ADMIN_KEY) as admin:
            model = backends[0].model
            for b in backends:
                admin.add_channel(f"b{b.port}", b.url, models=[model])
            key = admin.add_token("t").key
            headers = {"authorization": f"Bearer {key}"}
            long = chat_body(model, 1500, stream=True)
            with httpx.stream("POST", gateways[0].url + "/v1/chat/completions", json=long, headers=headers,
                              timeout=120) as held:
                lines = held.iter_lines()
                for _ in range(3):
                    next(lines)
                busy_channel = held.headers["x-llama-lab-channel"]
                time.sleep(1.0)  # a few exchanges: the other gateway now knows that channel is busy
                picked = [httpx.post(gateways[1].url + "/v1/chat/completions", json=chat_body(model, 2), headers=headers,
                                     timeout=60).headers["x-llama-lab-channel"] for _ in range(6)]
            assert busy_channel not in picked and len(set(picked)) == 1, (busy_channel, picked)
            # once the long request is gone, both channels are idle again and both get traffic
            time.sleep(1.0)
            picked = {httpx.post(gateways[1].url + "/v1/chat/completions", json=chat_body(model, 2), headers=headers,
                                 timeout=60).headers["x-llama-lab-channel"] for _ in range(12)}
            assert picked == {f"b{b.port}" for b in backends}
    finally:
        for g in gateways:
            g.stop()
        for b in backends:
            b.stop()
