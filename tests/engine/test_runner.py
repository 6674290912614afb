"""``llama_lab.serve``: a background server a notebook can start, re-run, stop and run twice."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from helpers.engine import wait_until

from llama_lab.web.launcher import free_port

from llama_lab import serve
from llama_lab.engine import EngineClosed
from llama_lab.engine import SamplingParams


def engine_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("llama-lab-engine-") and t.is_alive()}


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_serve_returns_at_once_and_stop_frees_the_port_and_the_engine(tiny_model):
    threads_before = engine_threads()
    started = time.perf_counter()
    handle = serve(tiny_model, port=0)
    assert time.perf_counter() - started < 20
    assert handle.running and handle.url == f"http://127.0.0.1:{handle.port}"
    assert handle.base_url == handle.url + "/v1"
    assert httpx.get(handle.base_url + "/models").status_code == 200
    new_threads = engine_threads() - threads_before
    assert len(new_threads) == 1
    engine = handle.engine
    handle.stop()
    assert not handle.running
    assert port_is_free(handle.port)
    wait_until(lambda: not any(t.is_alive() for t in new_threads), timeout=10)
    with pytest.raises(EngineClosed):
        engine.submit([1, 2, 3], SamplingParams(max_tokens=1), lambda delta: None)
    with pytest.raises(httpx.ConnectError):
        httpx.get(handle.url + "/health")


def test_rerunning_serve_on_the_same_port_replaces_the_old_server(tiny_engine):
    port = free_port()
    first = serve(tiny_engine, port=port, model_name="first")
    second = serve(tiny_engine, port=port, model_name="second")  # a re-run notebook cell
    try:
        assert not first.running and second.running
        assert [m["id"] for m in httpx.get(second.url + "/v1/models").json()["data"]] == ["second"]
    finally:
        second.stop()
    assert port_is_free(port)


def test_context_manager_and_readable_repr(tiny_model):
    with serve(tiny_model, port=0) as handle:
        text = repr(handle)
        assert "running" in text and handle.url in text and tiny_model.name in text and handle.base_url in text
        assert httpx.get(handle.url + "/health").json()["status"] == "ok"
    assert "stopped" in repr(handle)
    assert port_is_free(handle.port)


def test_two_servers_in_one_process(tiny_model, tiny_engine):
    with serve(tiny_model, port=0, model_name="alpha") as a, serve(tiny_engine, port=0, model_name="beta") as b:
        assert a.port != b.port and a.engine is not b.engine
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        ra = httpx.post(a.url + "/v1/chat/completions", json=body, timeout=60).json()
        rb = httpx.post(b.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert (ra["model"], rb["model"]) == ("alpha", "beta")
        a.stop()
        assert httpx.post(b.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    # b was given a shared engine: stopping b must not close it
    assert tiny_engine.generate([1, 2, 3], SamplingParams(max_tokens=1)).completion_tokens == 1


def test_logs_are_kept_for_the_notebook(tiny_model):
    with serve(tiny_model, port=0, log_level="info") as handle:
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 1500}
        with httpx.stream("POST", handle.url + "/v1/chat/completions", json=body, timeout=60) as r:
            next(r.iter_lines())
        wait_until(lambda: "client went away" in handle.logs(), timeout=10)


def test_a_port_held_by_another_program_gives_a_readable_error(tiny_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError, match="already in use"):
            serve(tiny_model, port=s.getsockname()[1])
