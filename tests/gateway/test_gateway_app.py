"""The gateway in front of real backend processes: routes, errors, billing, admin, failover."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from helpers.gateway import ADMIN_KEY, Backend, chat_body, free_port, sse_data, start_backends, wait_for
from llama_lab.gateway import GatewayAdminError, serve_gateway

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def backends():
    started = start_backends(2)
    yield started
    for b in started:
        b.stop()


@pytest.fixture()
def gateway(tmp_path):
    handle = serve_gateway(
        port=0, db=f"sqlite:///{tmp_path / 'gw.db'}", admin_key=ADMIN_KEY,
        probe_interval=0.3, channel_cache_ttl=0, failure_threshold=2,
    )
    yield handle
    handle.stop()


@pytest.fixture()
def admin(gateway):
    with gateway.admin() as gw:
        yield gw


def sdk(gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


def post(gateway, key: str, body: dict) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)


def test_chat_stream_and_not_through_the_sdk(gateway, admin, backends):
    admin.add_channel("a", backends[0].url + "/v1", models=[backends[0].model])
    token = admin.add_token("alice")
    client = sdk(gateway, token.key)
    reply = client.chat.completions.create(model=backends[0].model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.usage.completion_tokens == 3 and reply.choices[0].message.content

    chunks = list(client.chat.completions.create(
        model=backends[0].model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True))
    assert all(c.choices for c in chunks), "the usage-only chunk the client did not ask for must be stripped"
    assert len({c.id for c in chunks}) == 1

    chunks = list(client.chat.completions.create(
        model=backends[0].model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 3 and not chunks[-1].choices

    logs = wait_for(lambda: len(admin.logs()) == 3 and admin.logs())
    assert [r.status for r in logs] == [200, 200, 200]
    assert all(r.completion_tokens == 3 and r.prompt_tokens > 0 and r.channel_name == "a" for r in logs)
    assert admin.token(token.id).used == sum(r.total_tokens for r in logs)


def test_stream_bytes_are_the_backends_events(gateway, admin, backends):
    admin.add_channel("a", backends[0].url, models=[backends[0].model])
    key = admin.add_token("t").key
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=chat_body(backends[0].model, 5, stream=True),
                      headers={"authorization": f"Bearer {key}"}, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        text = resp.read().decode()
    data = sse_data(text)
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert all(e["object"] == "chat.completion.chunk" and e["choices"] for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_error_table(gateway, admin, backends):
    model = backends[0].model
    admin.add_channel("a", backends[0].url, models=[model])
    cases = []
    r = post(gateway, "sk-" + "0" * 48, chat_body(model))
    cases.append((r, 401, "Invalid token"))
    r = httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(model))
    cases.append((r, 401, "Missing API key"))
    disabled = admin.add_token("off", enabled=False)
    cases.append((post(gateway, disabled.key, chat_body(model)), 401, "disabled"))
    expired = admin.add_token("old", expires_at=time.time() - 10)
    cases.append((post(gateway, expired.key, chat_body(model)), 401, "expired"))
    scoped = admin.add_token("scoped", models=["other-model"])
    cases.append((post(gateway, scoped.key, chat_body(model)), 403, f"may not use model '{model}'"))
    empty = admin.add_token("empty", quota=0)
    cases.append((post(gateway, empty.key, chat_body(model)), 429, "exhausted its quota"))
    ok = admin.add_token("ok")
    cases.append((post(gateway, ok.key, chat_body("no-such-model")), 503, "No channel serves model 'no-such-model'"))
    for resp, status, words in cases:
        assert resp.status_code == status, resp.text
        error = resp.json()["error"]
        assert words in error["message"] and set(error) >= {"message", "type", "code"}
    assert cases[5][0].json()["error"]["code"] == "insufficient_quota"
    assert cases[5][0].json()["error"]["type"] == "insufficient_quota"
    with pytest.raises(openai.RateLimitError, match="quota"):
        sdk(gateway, empty.key).chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    assert {r.status for r in admin.logs()} >= {401, 403, 429, 503}


def test_odd_but_parseable_bodies_get_4xx_or_pass_through(gateway, admin, backends):
    admin.add_channel("a", backends[0].url, models=[backends[0].model])
    key = admin.add_token("t", quota=10**6).key
    odd = [
        chat_body(backends[0].model, 2, stream=True, stream_options="yes"),  # not an object: used to crash the relay
        chat_body(backends[0].model, "two"),
        chat_body(backends[0].model, 2, n="many"),
    ]
    for body in odd:
        resp = post(gateway, key, body)
        assert resp.status_code < 500, resp.text
        if resp.status_code >= 400:
            assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert post(gateway, key, odd[1]).json()["error"]["param"] == "max_tokens"


def test_disabled_channels_give_503_saying_so(gateway, admin, backends):
    ch = admin.add_channel("gpu", backends[0].url, models=[backends[0].model])
    admin.disable_channel(ch.id)
    resp = post(gateway, admin.add_token("t").key, chat_body(backends[0].model))
    assert resp.status_code == 503 and "'gpu' (disabled)" in resp.json()["error"]["message"]


def test_nextchat_billing_and_cors(gateway, admin, backends):
    admin.add_channel("a", backends[0].url, models=[backends[0].model])
    token = admin.add_token("t", quota=1_000_000)
    post(gateway, token.key, chat_body(backends[0].model, 4))
    used = wait_for(lambda: admin.token(token.id).used)
    headers = {"authorization": f"Bearer {token.key}"}
    for prefix in ("", "/v1"):
        sub = httpx.get(gateway.url + prefix + "/dashboard/billing/subscription", headers=headers).json()
        assert sub["hard_limit_usd"] == pytest.approx(2.0)  # 1 USD = 500k tokens
        usage = httpx.get(gateway.url + prefix + "/dashboard/billing/usage?start_date=2024-01-01&end_date=2024-02-01",
                          headers=headers).json()
        assert usage["total_usage"] == pytest.approx(used / 500_000 * 100)
    unlimited = admin.add_token("u")
    sub = httpx.get(gateway.url + "/dashboard/billing/subscription", headers={"authorization": f"Bearer {unlimited.key}"}).json()
    assert sub["hard_limit_usd"] == 100_000_000
    preflight = {"access-control-request-method": "POST", "access-control-request-headers": "authorization, content-type"}
    ok = httpx.options(gateway.url + "/v1/chat/completions", headers={"origin": "http://localhost:3000", **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:3000"
    other = httpx.options(gateway.url + "/v1/chat/completions", headers={"origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_admin_rest_contract(gateway, backends):
    api = gateway.url + "/api"
    assert httpx.get(api + "/channels").status_code == 401
    assert "admin key" in httpx.get(api + "/tokens", headers={"authorization": "Bearer nope"}).json()["error"]["message"]
    h = {"authorization": f"Bearer {ADMIN_KEY}"}
    body = {"name": "a", "base_url": backends[0].url, "api_key": "k", "models": ["m"], "model_mapping": {"x": "m"},
            "priority": 2, "weight": 3, "enabled": True}
    ch = httpx.post(api + "/channels", json=body, headers=h)
    assert ch.status_code == 201 and ch.json()["has_api_key"] and "api_key" not in ch.json()
    cid = ch.json()["id"]
    assert httpx.patch(f"{api}/channels/{cid}", json={"weight": 7}, headers=h).json()["weight"] == 7
    assert [c["weight"] for c in httpx.get(api + "/channels", headers=h).json()] == [7]
    bad = httpx.post(api + "/channels", json={"name": "b", "base_url": "localhost:1"}, headers=h)
    assert bad.status_code == 400 and "http://" in bad.json()["error"]["message"]
    tok = httpx.post(api + "/tokens", json={"name": "t", "models": [], "expires_at": None, "quota": 10}, headers=h)
    assert tok.status_code == 201 and tok.json()["key"].startswith("sk-")
    tid = tok.json()["id"]
    listed = httpx.get(api + "/tokens", headers=h).json()
    assert "key" not in listed[0] and listed[0]["quota"] == 10 and listed[0]["used"] == 0
    assert httpx.patch(f"{api}/tokens/{tid}", json={"quota": None, "enabled": False}, headers=h).json()["quota"] is None
    assert httpx.delete(f"{api}/tokens/{tid}", headers=h).json()["deleted"]
    assert httpx.delete(f"{api}/tokens/{tid}", headers=h).status_code == 404
    assert httpx.delete(f"{api}/channels/{cid}", headers=h).status_code == 200
    assert httpx.get(api + "/logs?limit=5", headers=h).json() == []


def test_channel_test_reports_latency_or_what_is_wrong(admin, backends):
    good = admin.add_channel("good", backends[0].url + "/v1")  # no models: the test asks /v1/models
    result = admin.test_channel(good.id)
    assert result.ok and result.latency_ms > 0 and result.model == backends[0].model
    port = free_port()
    bad = admin.add_channel("bad", f"http://127.0.0.1:{port}", models=["m"])
    result = admin.test_channel(bad.id)
    assert not result.ok and f"connection refused at http://127.0.0.1:{port}" in result.error
    with pytest.raises(GatewayAdminError, match="No channel with id 999"):
        admin.test_channel(999)


def test_model_mapping_and_model_list(gateway, admin, backends):
    admin.add_channel("a", backends[0].url, models=[backends[0].model], model_mapping={"gpt-4o-mini": backends[0].model})
    token = admin.add_token("t", models=["gpt-4o-mini"])
    client = sdk(gateway, token.key)
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini"]
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.usage.completion_tokens == 2


def test_failover_auto_disable_and_probe_reenable(gateway, admin, backends):
    port = free_port()
    dead = admin.add_channel("flaky", f"http://127.0.0.1:{port}", models=[backends[0].model], priority=10)
    admin.add_channel("steady", backends[0].url, models=[backends[0].model])
    key = admin.add_token("t").key
    for _ in range(3):
        resp = post(gateway, key, chat_body(backends[0].model, 2))
        assert resp.status_code == 200
    assert {r.channel_name for r in wait_for(lambda: len(admin.logs()) == 3 and admin.logs())} == {"steady"}
    flaky = next(c for c in admin.channels() if c.id == dead.id)
    assert flaky.auto_disabled and "connection refused" in flaky.disabled_reason  # after failure_threshold=2
    revived = Backend(port).start().wait()
    try:
        assert wait_for(lambda: not next(c for c in admin.channels() if c.id == dead.id).auto_disabled, timeout=15)
        resp = post(gateway, key, chat_body(backends[0].model, 2))
        assert resp.status_code == 200
        newest = wait_for(lambda: len(admin.logs()) == 4 and admin.logs(limit=1)[0])  # settled after the response
        assert newest.channel_name == "flaky"
    finally:
        revived.stop()


def test_5xx_from_a_channel_retries_on_the_next(gateway, admin, backends, tmp_path):
    # A real 5xx: a second gateway whose only channel is down answers 502.
    inner = serve_gateway(port=0, db=f"sqlite:///{tmp_path / 'inner.db'}", admin_key="inner")
    try:
        with inner.admin() as inner_admin:
            inner_admin.add_channel("down", f"http://127.0.0.1:{free_port()}", models=[backends[0].model])
            inner_key = inner_admin.add_token("outer").key
        admin.add_channel("inner-gateway", inner.url + "/v1", api_key=inner_key, models=[backends[0].model], priority=5)
        admin.add_channel("direct", backends[1].url, models=[backends[0].model])
        key = admin.add_token("t").key
        resp = post(gateway, key, chat_body(backends[0].model, 2, stream=True))
        assert resp.status_code == 200 and sse_data(resp.text)[-1] == "[DONE]"
        assert wait_for(lambda: admin.logs(limit=1))[0].channel_name == "direct"
    finally:
        inner.stop()


def test_all_channels_down_says_where(gateway, admin):
    port = free_port()
    admin.add_channel("gpu", f"http://127.0.0.1:{port}/v1", models=["m"])
    resp = post(gateway, admin.add_token("t").key, chat_body("m"))
    assert resp.status_code == 502
    assert f"channel 'gpu': connection refused at http://127.0.0.1:{port}/v1" in resp.json()["error"]["message"]


def test_disabling_a_channel_moves_traffic(gateway, admin, backends):
    a = admin.add_channel("cpu", backends[0].url, models=[backends[0].model])
    admin.add_channel("gpu", backends[1].url, models=[backends[0].model])
    admin.disable_channel(a.id)
    key = admin.add_token("t").key
    for _ in range(4):
        assert post(gateway, key, chat_body(backends[0].model, 1)).status_code == 200
    assert {r.channel_name for r in wait_for(lambda: len(admin.logs()) == 4 and admin.logs())} == {"gpu"}


def test_subnet_restriction(gateway, admin, backends):
    admin.add_channel("a", backends[0].url, models=[backends[0].model])
    outside = admin.add_token("lan-only", subnets=["192.168.0.0/16"])
    resp = post(gateway, outside.key, chat_body(backends[0].model))
    assert resp.status_code == 403 and "may not be used from 127.0.0.1" in resp.json()["error"]["message"]
    inside = admin.add_token("local", subnets=["127.0.0.0/8"])
    assert post(gateway, inside.key, chat_body(backends[0].model)).status_code == 200


def test_serve_gateway_replaces_previous_instance_on_same_port(tmp_path):
    port = free_port()
    first = serve_gateway(port=port, db=f"sqlite:///{tmp_path / 'a.db'}", admin_key="a")
    second = serve_gateway(port=port, db=f"sqlite:///{tmp_path / 'a.db'}", admin_key="a")
    try:
        assert not first.running and second.running and "running" in repr(second)
        assert httpx.get(second.url + "/health").json() == {"status": "ok"}
    finally:
        second.stop()
    assert "stopped" in repr(second)


def _samples(gateway) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(gateway.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_headers_and_metrics_say_which_channel_answered_and_what_the_gateway_cost(gateway, admin, backends):
    model = backends[0].model
    admin.add_channel("gpu box", backends[0].url + "/v1", models=[model])
    token = admin.add_token("alice", quota=100_000)
    plain = post(gateway, token.key, chat_body(model, 3))
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {token.key}"},
                      json=chat_body(model, 3, stream=True, stream_options={"include_usage": True}), timeout=60) as streamed:
        usage = json.loads([d for d in sse_data(streamed.read().decode()) if '"usage"' in d][-1])["usage"]
    for r in (plain, streamed):
        assert r.status_code == 200 and r.headers["x-llama-lab-channel"] == "gpu box"
        assert 0 <= float(r.headers["x-llama-lab-overhead-ms"]) < 10_000
    assert post(gateway, token.key, chat_body("nope", 3)).status_code == 503
    assert httpx.get(gateway.url + "/metrics").status_code == 401  # it names tokens: the admin key guards it

    prompt = plain.json()["usage"]["prompt_tokens"] + usage["prompt_tokens"]
    completion = plain.json()["usage"]["completion_tokens"] + usage["completion_tokens"]
    ok = ("llama_lab_gateway_requests_total", (("channel", "gpu box"), ("model", model), ("status", "200"), ("token", "alice")))
    samples = wait_for(lambda: (s := _samples(gateway)).get(ok) == 2 and s)
    assert samples[("llama_lab_gateway_requests_total",
                    (("channel", ""), ("model", "nope"), ("status", "503"), ("token", "alice")))] == 1
    assert samples[("llama_lab_gateway_tokens_total", (("channel", "gpu box"), ("kind", "prompt"), ("token", "alice")))] == prompt
    assert samples[("llama_lab_gateway_tokens_total",
                    (("channel", "gpu box"), ("kind", "completion"), ("token", "alice")))] == completion
    assert samples[("llama_lab_gateway_first_byte_seconds_count", (("channel", "gpu box"),))] == 2
    assert samples[("llama_lab_gateway_overhead_seconds_count", ())] == 2
    assert samples[("llama_lab_gateway_channel_up", (("channel", "gpu box"),))] == 1
    assert samples[("llama_lab_gateway_token_used_tokens", (("token", "alice"),))] == prompt + completion
    assert samples[("llama_lab_gateway_token_quota_remaining_tokens", (("token", "alice"),))] == 100_000 - prompt - completion
    assert samples[("llama_lab_gateway_requests_in_flight", ())] == 0


def test_a_busy_channel_429_goes_to_the_next_channel_and_is_not_counted_as_a_failure(gateway, admin, backends):
    from helpers.gateway import BusyServer

    busy = BusyServer(retry_after="7")
    try:
        model = backends[0].model
        jammed = admin.add_channel("busy", busy.url, models=[model, "only-busy"], priority=10)
        admin.add_channel("spare", backends[0].url, models=[model], priority=0)
        token = admin.add_token("alice")
        for _ in range(3):  # more than failure_threshold (2): a busy channel is not auto-disabled
            r = post(gateway, token.key, chat_body(model, 2))
            assert r.status_code == 200 and r.headers["x-llama-lab-channel"] == "spare"
        assert not next(c for c in admin.channels() if c.id == jammed.id).auto_disabled
        # every channel busy: the client gets the 429 and its retry-after, which the SDK honours
        r = post(gateway, token.key, chat_body("only-busy", 2))
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        busy.close()
