"""A server that never freezes: huge bodies are refused unread, long prompts are tokenized off the event loop.

The seed's demo server (and this one before issue 10) read a 10 MB chat message, then tokenized it
on the event loop for 13 s before answering 400; meanwhile ``/health`` and every stream stalled.
Each test here runs a real server and measures ``/health`` and a concurrent stream while it works.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from helpers.engine import wait_idle

from llama_lab import serve
from llama_lab.server.settings import ServerSettings
from llama_lab.web.body_limit import BodyLimit
from llama_lab.web.flags import FlagParser, add_settings_flags, settings_from_args

HI = [{"role": "user", "content": "hi"}]
HEALTH_BUDGET_S = 0.100  # what "answers at once" means here, on a shared 2-core machine
DEFAULT_LIMIT = ServerSettings().max_body_bytes


def chat_body(text: str) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": text}]}).encode()


def assert_413(r: httpx.Response, limit: int) -> dict:
    assert r.status_code == 413, r.text[:300]
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["code"] == "request_too_large"
    assert str(limit) in err["message"] and "--max-body-bytes" in err["message"]
    return err


class HealthProbe(threading.Thread):
    """Polls ``/health`` on its own connection and keeps every latency, until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.latencies, self.failures = url, [], []
        self.stopped = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            client.get("/health")  # connect outside the measurement
            while not self.stopped.is_set():
                started = time.perf_counter()
                r = client.get("/health")
                self.latencies.append(time.perf_counter() - started)
                if r.status_code != 200:
                    self.failures.append(r.status_code)
                time.sleep(0.01)

    def finish(self) -> list[float]:
        self.stopped.set()
        self.join(60)
        assert not self.failures, self.failures
        assert len(self.latencies) >= 3, "the probe barely ran"
        return self.latencies


class Stream(threading.Thread):
    """A streaming chat that runs alongside; records when each chunk arrives, until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.arrivals, self.error = url, [], None
        self.started, self.stopped = threading.Event(), threading.Event()

    def run(self) -> None:
        body = {"messages": [{"role": "user", "content": "keep going"}], "stream": True, "max_tokens": 1900}
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.arrivals.append(time.perf_counter())
                        self.started.set()
                    if self.stopped.is_set() or line == "data: [DONE]":
                        break
        except BaseException as exc:  # reported by finish()
            self.error = exc
            self.started.set()

    def finish(self, since: float, until: float) -> float:
        """The longest wait between two chunks around [since, until], once a chunk came after ``until``."""
        deadline = time.monotonic() + 30
        while self.is_alive() and not any(t > until for t in self.arrivals) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.stopped.set()
        self.join(60)
        assert self.error is None, self.error
        before = [t for t in self.arrivals if t < since]
        after = [t for t in self.arrivals if t > until]
        assert before and after, "the stream did not go on answering after the server's work"
        marks = [before[-1], *[t for t in self.arrivals if since <= t <= until], after[0]]
        return max(b - a for a, b in zip(marks, marks[1:]))


def watch_while(server_url: str, work) -> tuple[list[float], float, object]:
    """Run ``work()`` while probing /health and a stream; return the latencies, the longest stream gap, the result.

    Runs a second time if /health missed its budget: on a busy shared 2-core machine one poll can
    lose 100 ms to the OS scheduler, while a loop blocked by tokenizing misses it by seconds on
    every attempt, so the retry cannot hide that bug.
    """
    latencies, gap, result = _watch_once(server_url, work)
    if max(latencies) >= HEALTH_BUDGET_S:
        latencies, gap, result = _watch_once(server_url, work)
    return latencies, gap, result


def _watch_once(server_url: str, work) -> tuple[list[float], float, object]:
    stream = Stream(server_url)
    stream.start()
    assert stream.started.wait(60), "the stream never started"
    probe = HealthProbe(server_url)
    probe.start()
    time.sleep(0.05)
    since = time.perf_counter()
    result = work()
    until = time.perf_counter()
    latencies = probe.finish()
    gap = stream.finish(since, until)
    return latencies, gap, result


# ---------------------------------------------------------------- the limit itself


def test_a_10mb_body_gets_an_openai_shaped_413_and_the_server_stays_healthy(http):
    text = "a " * 5_000_000  # the seed's case: ~10 MB in one message
    r = http.post("/v1/chat/completions", content=chat_body(text), headers={"content-type": "application/json"})
    err = assert_413(r, DEFAULT_LIMIT)
    assert err["param"] is None
    r = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2})  # same connection still works
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_a_413_is_counted_and_readable_by_an_allowed_browser_page(http):
    r = http.post("/v1/chat/completions", content=b"x" * (DEFAULT_LIMIT + 1), headers={"Origin": "http://localhost:3000"})
    assert_413(r, DEFAULT_LIMIT)
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert 'llama_lab_requests_total{path="/v1/chat/completions",status="413"}' in http.get("/metrics").text


def _status_of_raw_request(port: int, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send a request by hand (headers, then some body) and read the status line without sending the rest."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        return sock.recv(4096).split(b"\r\n", 1)[0]


def test_a_declared_length_over_the_limit_is_refused_before_any_body_byte_is_read(tiny_server):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000\r\n\r\n")
    # not one body byte is sent: a server that buffers the body first would wait here until the timeout
    assert _status_of_raw_request(tiny_server.port, head, []) == b"HTTP/1.1 413 Request Entity Too Large"


def test_a_chunked_body_is_refused_once_it_passes_the_limit_without_reading_the_rest(tiny_engine):
    limit = 64 * 1024
    with serve(tiny_engine, port=0, max_body_bytes=limit) as server:
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"a" * 16 * 1024
        parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (limit // len(chunk) + 1)  # just past the limit, no end chunk
        assert _status_of_raw_request(server.port, head, parts) == b"HTTP/1.1 413 Request Entity Too Large"
        with httpx.Client(base_url=server.url, timeout=60) as http:
            just_under = json.dumps({"messages": HI, "max_tokens": 1}).encode().ljust(limit, b" ")
            r = http.post("/v1/chat/completions", content=(just_under[i:i + 4096] for i in range(0, limit, 4096)))
            assert r.status_code == 200, r.text  # a body of exactly the limit, streamed in pieces, is fine
            assert_413(http.post("/v1/chat/completions", content=just_under + b" "), limit)


def test_the_limit_is_a_setting_flag_and_env_var(monkeypatch):
    assert 2**20 <= DEFAULT_LIMIT <= 16 * 2**20  # "a few MB": room for long prompts, not for a flood
    parser = FlagParser(prog="llama-lab serve")
    add_settings_flags(parser, ServerSettings)
    assert settings_from_args(ServerSettings, parser.parse_args(["--max-body-bytes", "65536"])).max_body_bytes == 65536
    monkeypatch.setenv("LLAMA_LAB_MAX_BODY_BYTES", "123456")
    assert ServerSettings().max_body_bytes == 123456


def test_a_client_that_leaves_mid_upload_reaches_the_app_as_a_disconnect():
    """The app sees ``http.disconnect`` (the gateway logs the abandoned request), and nothing is sent to the client."""
    arriving = [{"type": "http.request", "body": b'{"messages": ', "more_body": True}, {"type": "http.disconnect"}]
    seen, sent = [], []

    async def app(scope, receive, send):
        seen.append(await receive())

    async def receive():
        return arriving.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "client": ("127.0.0.1", 1)}
    asyncio.run(BodyLimit(app, max_bytes=1024)(scope, receive, send))
    assert seen == [{"type": "http.disconnect"}] and sent == []


# ---------------------------------------------------------------- the event loop keeps answering


def test_health_and_a_stream_keep_answering_while_10mb_bodies_are_refused(tiny_server, tiny_engine):
    big = chat_body("a " * 5_000_000)

    def work():
        with httpx.Client(base_url=tiny_server.url, timeout=120) as client:
            return [client.post("/v1/chat/completions", content=big).status_code for _ in range(3)]

    latencies, gap, statuses = watch_while(tiny_server.url, work)
    assert statuses == [413, 413, 413]
    assert max(latencies) < HEALTH_BUDGET_S, f"/health took up to {max(latencies) * 1000:.0f} ms"
    assert gap < 1.0, f"the concurrent stream stalled for {gap:.2f} s"
    wait_idle(tiny_engine)


def _too_long_just_under(limit: int, field: str) -> bytes:
    """A body of ``"a a a ..."`` (one token per 2 bytes) whose size is the limit, give or take one byte."""
    def body(n: int) -> bytes:
        text = "a " * n
        return json.dumps({"messages": [{"role": "user", "content": text}]} if field == "messages" else {field: text}).encode()

    payload = body((limit - len(body(0))) // 2)
    assert limit - 2 < len(payload) <= limit
    return payload


def _assert_context_length_400(r: httpx.Response, field: str, context_length: int) -> None:
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == field
    assert f"maximum context length is {context_length} tokens" in err["message"]


def test_a_too_long_prompt_just_under_the_default_limit_gets_the_context_length_400(tiny_server, tiny_engine):
    payload = _too_long_just_under(DEFAULT_LIMIT, "messages")  # ~1M tokens to template and tokenize

    def work():
        return httpx.post(tiny_server.url + "/v1/chat/completions", content=payload, timeout=300)

    latencies, gap, r = watch_while(tiny_server.url, work)
    _assert_context_length_400(r, "messages", tiny_engine.loaded.context_length)
    assert max(latencies) < HEALTH_BUDGET_S, f"/health took up to {max(latencies) * 1000:.0f} ms while tokenizing"
    assert gap < 1.0, f"the concurrent stream stalled for {gap:.2f} s while tokenizing"
    wait_idle(tiny_engine)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/embeddings"])
def test_completions_and_embeddings_tokenize_off_the_event_loop_too(tiny_engine, path):
    limit = 2**20  # half the default's work; the same code path
    field = {"/v1/completions": "prompt", "/v1/embeddings": "input"}[path]
    with serve(tiny_engine, port=0, max_body_bytes=limit, log_level="warning") as server:
        payload = _too_long_just_under(limit, field)

        def work():
            return httpx.post(server.url + path, content=payload, timeout=120)

        latencies, gap, r = watch_while(server.url, work)
        _assert_context_length_400(r, field, tiny_engine.loaded.context_length)
        assert max(latencies) < HEALTH_BUDGET_S, f"/health took up to {max(latencies) * 1000:.0f} ms while tokenizing"
        assert gap < 1.0, f"the concurrent stream stalled for {gap:.2f} s while tokenizing"
    wait_idle(tiny_engine)
