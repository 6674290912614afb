"""End to end with real processes: backend crash mid-stream, client stop, restarts, CLI (quota races: test_gateway_quota)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from helpers.gateway import ADMIN_KEY, ROOT, Backend, chat_body, free_port, sse_data, wait_for
from llama_lab.gateway import serve_gateway

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture()
def gateway(tmp_path):
    handle = serve_gateway(port=0, db=f"sqlite:///{tmp_path / 'gw.db'}", admin_key=ADMIN_KEY, channel_cache_ttl=0)
    yield handle
    handle.stop()


def test_backend_killed_mid_stream_ends_with_visible_error(gateway, tmp_path):
    victim = Backend().start().wait()
    try:
        with gateway.admin() as admin:
            admin.add_channel("victim", victim.url, models=[victim.model])
            key = admin.add_token("t").key
            body = chat_body(victim.model, 1500, stream=True)
            with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                              headers={"authorization": f"Bearer {key}"}, timeout=60) as resp:
                assert resp.status_code == 200
                lines = resp.iter_lines()
                seen = [next(lines) for _ in range(6)]
                victim.kill()
                seen += list(lines)
            data = sse_data("\n".join(seen))
            assert data[-1] == "[DONE]"
            error_event = json.loads(data[-2])
            assert "failed mid-stream" in error_event["error"]["message"]
            text_event = json.loads(data[-3])
            assert "[gateway error: channel 'victim' failed mid-stream" in text_event["choices"][0]["delta"]["content"]
            row = wait_for(lambda: admin.logs(limit=1))[0]
            assert row.status == 502 and row.completion_tokens > 0
            assert admin.token(1).used == row.total_tokens
    finally:
        victim.stop()


def test_sdk_sees_mid_stream_failure_as_an_exception(gateway):
    victim = Backend().start().wait()
    try:
        with gateway.admin() as admin:
            admin.add_channel("victim", victim.url, models=[victim.model])
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=admin.add_token("t").key, max_retries=0)
            stream = client.chat.completions.create(model=victim.model, messages=[{"role": "user", "content": "x"}],
                                                    max_tokens=1500, stream=True)
            with pytest.raises(openai.APIError, match="failed mid-stream"):
                for i, _chunk in enumerate(stream):
                    if i == 3:
                        victim.kill()
    finally:
        victim.stop()


def test_client_disconnect_stops_the_backend(gateway, backend):
    with gateway.admin() as admin:
        admin.add_channel("b", backend.url, models=[backend.model])
        key = admin.add_token("t").key
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=chat_body(backend.model, 1500, stream=True),
                          headers={"authorization": f"Bearer {key}"}, timeout=60) as resp:
            lines = resp.iter_lines()
            for _ in range(6):
                next(lines)
            assert backend.running_requests() == 1
        stopped_at = time.monotonic()
        assert wait_for(lambda: backend.running_requests() == 0, timeout=5), "backend kept generating"
        assert time.monotonic() - stopped_at < 2.0
        row = wait_for(lambda: admin.logs(limit=1))[0]
        assert row.status == 499 and "client disconnected" in row.error and 0 < row.completion_tokens < 1500


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama_lab", "gateway", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def _start_gateway_process(port: int, db: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_lab.gateway", "--port", str(port), "--db", db, "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, "LLAMA_LAB_ADMIN_KEY": ADMIN_KEY}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: _healthy(url), timeout=30), proc.stderr.read().decode() if proc.poll() is not None else "no /health"
    return proc


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_cli_and_restart_persistence(backend, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    db = f"sqlite:///{tmp_path / 'persist.db'}"
    env = {"LLAMA_LAB_ADMIN_KEY": ADMIN_KEY, "LLAMA_LAB_GATEWAY_URL": url}
    proc = _start_gateway_process(port, db)
    try:
        out = _cli("channel", "add", "gpu", backend.url + "/v1", "--models", backend.model, "--priority", "5", env=env)
        assert out.returncode == 0, out.stderr
        out = _cli("token", "add", "alice", "--quota", "100000", "--expires", "30d", "--json", env=env)
        assert out.returncode == 0, out.stderr
        key = json.loads(out.stdout)["key"]
        test = _cli("channel", "test", "1", env=env)
        assert test.returncode == 0 and "latency_ms" in test.stdout
        dead = _cli("channel", "add", "nowhere", f"http://127.0.0.1:{free_port()}", "--models", "m", env=env)
        assert dead.returncode == 0
        failed = _cli("channel", "test", "2", env=env)
        assert failed.returncode == 1 and "connection refused" in failed.stdout
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        client.chat.completions.create(model=backend.model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        wrong_key = _cli("token", "list", "--admin-key", "wrong", env=env)
        assert wrong_key.returncode == 1 and "Invalid admin key" in wrong_key.stderr
    finally:
        proc.terminate()
        proc.wait(15)
    proc = _start_gateway_process(port, db)
    try:
        tokens = _cli("token", "list", "--json", env=env)
        used_before = json.loads(tokens.stdout)[0]["used"]
        assert used_before > 0
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        client.chat.completions.create(model=backend.model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        time.sleep(0.3)
        assert json.loads(_cli("token", "list", "--json", env=env).stdout)[0]["used"] > used_before
        listing = _cli("channel", "list", env=env)
        assert "gpu" in listing.stdout and "nowhere" in listing.stdout
        assert _cli("channel", "update", "2", "--disable", env=env).returncode == 0
        assert _cli("token", "update", "1", "--quota", "1", env=env).returncode == 0
        refused = httpx.post(url + "/v1/chat/completions", json=chat_body(backend.model), headers={"authorization": f"Bearer {key}"})
        assert refused.status_code == 429
        logs = _cli("logs", "--limit", "10", env=env)
        assert logs.returncode == 0 and "alice" in logs.stdout and "429" in logs.stdout
        assert _cli("channel", "delete", "2", env=env).returncode == 0
        assert _cli("token", "delete", "1", env=env).returncode == 0
    finally:
        proc.terminate()
        proc.wait(15)


def test_cli_says_when_the_gateway_is_not_running():
    out = _cli("channel", "list", "--url", f"http://127.0.0.1:{free_port()}", "--admin-key", "x")
    assert out.returncode == 1 and "cannot connect to the gateway" in out.stderr
