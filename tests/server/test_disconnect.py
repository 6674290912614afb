"""The stop button stops the hardware: a client that goes away cancels its request within one step.

Each test counts the engine's decode steps / prefill chunks around the disconnect (the seed's bug
was a server that kept generating at full power after NextChat's stop button), and checks that a
request running alongside is not disturbed.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from helpers.engine import steps_after_cancel, wait_idle, wait_until

HI = [{"role": "user", "content": "hi"}]
# Between the client closing its socket and the server noticing, the engine may finish the
# step in flight (and, on a fast machine, one or two more): the noticing is what "within one
# step" is measured from (helpers.engine.steps_after_cancel), this is only a sanity bound.
DETECTION_SLACK_STEPS = 5


class Bystander(threading.Thread):
    """A streaming request that runs alongside the one that gets cancelled; it must finish normally."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.started = threading.Event()
        self.chunks: list[dict] = []
        self.done_marker = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            body = {"messages": [{"role": "user", "content": "keep going"}], "stream": True,
                    "max_tokens": self.max_tokens, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=300) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        self.done_marker = True
                        break
                    self.chunks.append(json.loads(line[6:]))
                    self.started.set()
        except BaseException as exc:  # reported by check()
            self.error = exc
            self.started.set()

    def check(self) -> None:
        self.join(300)
        assert self.error is None, self.error
        assert self.done_marker, "the bystander's stream did not end with [DONE]"
        finishes = [c["choices"][0]["finish_reason"] for c in self.chunks if c["choices"]]
        assert finishes[-1] == "length"
        assert self.chunks[-1]["usage"]["completion_tokens"] == self.max_tokens


def _new_handle(engine, before: int, predicate):
    return wait_until(lambda: next((h for h in engine.handles[before:] if predicate(h)), None), timeout=30)


def _assert_engine_went_idle(engine) -> None:
    wait_idle(engine)
    steps, chunks = engine.stats.steps, engine.stats.prefill_chunks
    time.sleep(0.5)
    assert (engine.stats.steps, engine.stats.prefill_chunks) == (steps, chunks), "the engine kept working"
    assert engine.stats.running == 0


def test_streaming_client_that_closes_mid_stream_stops_generation(tiny_server, tiny_engine):
    engine = tiny_engine
    wait_idle(engine)
    before, cancelled = len(engine.handles), engine.stats.requests_cancelled
    bystander = Bystander(tiny_server.url, max_tokens=60)
    bystander.start()
    assert bystander.started.wait(60)
    body = {"messages": HI, "stream": True, "max_tokens": 1900}
    with httpx.stream("POST", tiny_server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 4:
                break
        handle = _new_handle(engine, before, lambda h: h.params.max_tokens == 1900)
        other = _new_handle(engine, before, lambda h: h.params.max_tokens == 60)
    steps_at_close = engine.stats.steps  # the client has closed the connection here
    assert handle.done.wait(30), "the abandoned request never ended"
    assert not other.done.is_set() or bystander.chunks, "the bystander should overlap the cancel"
    assert steps_after_cancel(handle) <= 1
    assert handle.last_step - steps_at_close <= DETECTION_SLACK_STEPS
    assert handle.steps_run < 1900
    bystander.check()
    _assert_engine_went_idle(engine)
    assert engine.stats.requests_cancelled == cancelled + 1
    metrics = httpx.get(tiny_server.url + "/metrics").text
    assert "llama_lab_client_disconnects_total" in metrics


def test_non_streaming_client_that_times_out_stops_generation(tiny_server, tiny_engine):
    engine = tiny_engine
    wait_idle(engine)
    before = len(engine.handles)
    bystander = Bystander(tiny_server.url, max_tokens=40)
    bystander.start()
    assert bystander.started.wait(60)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_server.url + "/v1/chat/completions", json={"messages": HI, "max_tokens": 2000},
                   timeout=httpx.Timeout(30, read=0.5))
    steps_at_close = engine.stats.steps
    handle = _new_handle(engine, before, lambda h: h.params.max_tokens == 2000)
    assert handle.done.wait(30)
    assert steps_after_cancel(handle) <= 1
    assert (handle.last_step or steps_at_close) - steps_at_close <= DETECTION_SLACK_STEPS
    assert handle.steps_run < 2000
    bystander.check()
    _assert_engine_went_idle(engine)


def test_client_that_leaves_during_a_long_prefill_stops_the_prefill(tiny_server, tiny_engine):
    """1500 prompt tokens in chunks of 32 = 47 forward passes; leaving after the first one skips the rest."""
    engine = tiny_engine
    assert engine.prefill_chunk == 32
    wait_idle(engine)
    before = len(engine.handles)
    bystander = Bystander(tiny_server.url, max_tokens=30)
    bystander.start()
    assert bystander.started.wait(60)
    prompt = list(range(1000, 2500))  # 1500 token ids
    payload = json.dumps({"prompt": prompt, "max_tokens": 5}).encode()
    chunks_before = engine.stats.prefill_chunks
    sock = socket.create_connection(("127.0.0.1", tiny_server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    handle = _new_handle(engine, before, lambda h: len(h.prompt_ids) == 1500)
    wait_until(lambda: engine.stats.prefill_chunks > chunks_before, timeout=30, interval=0.001)
    sock.close()  # the user pressed stop while the prompt was still being read
    chunks_at_close = engine.stats.prefill_chunks
    assert handle.done.wait(30)
    chunks_after = engine.stats.prefill_chunks - chunks_at_close
    assert chunks_after <= 2, f"{chunks_after} prefill chunks ran after the client left"
    assert engine.stats.prefill_chunks - chunks_before < 47
    assert handle.steps_run == 0  # it never reached the decode batch
    bystander.check()
    _assert_engine_went_idle(engine)
