"""Shared fixtures: models are loaded once per session; servers bind free 127.0.0.1 ports.

Engines and servers decode eagerly here unless a test asks for compilation (``compile=True``,
``--compile``): compiling is tested on its own, and the rest of the suite stays fast. Subprocess
servers inherit this through ``LLAMA_LAB_COMPILE``.
"""

from __future__ import annotations

import os

os.environ.setdefault("LLAMA_LAB_COMPILE", "0")

import queue  # noqa: E402
import subprocess  # noqa: E402
import sys
import time
from pathlib import Path

import httpx
import pytest

from llama_lab.web.launcher import ServerProcess, llama_lab_command


@pytest.fixture(scope="session")
def tiny_model():
    """Random-weight tiny Llama with the real SmolLM2 tokenizer: loads in well under a second."""
    from llama_lab import load_model

    return load_model("random:tiny")


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct (converted once to the cache, then ~1 s)."""
    from llama_lab import load_model

    return load_model("default")


# ---------------------------------------------------------------- servers (tests/test_app.py and friends)


ROOT = Path(__file__).resolve().parents[1]


def recording_engine(loaded, **kwargs):
    """A real Engine that also keeps every RequestHandle, so tests can read ``steps_after_cancel``."""
    from llama_lab.engine import Engine

    class RecordingEngine(Engine):
        def __init__(self, *args, **kw):
            self.handles = []
            super().__init__(*args, **kw)

        def submit(self, *args, **kw):
            handle = super().submit(*args, **kw)
            self.handles.append(handle)
            return handle

    return RecordingEngine(loaded, **kwargs)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01):
    """Poll ``predicate`` until it is truthy; fail the test with a clear message on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def cancel_after_tokens(engine, prompt_ids, params, tokens: int = 5, timeout: float = 60.0):
    """Stream a request, cancel it after ``tokens`` token deltas; return (final delta, handle)."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    handle = engine.submit(prompt_ids, params, events.put)
    seen = 0
    while seen < tokens:
        if events.get(timeout=timeout).token_ids:
            seen += 1
    handle.cancel()
    while (delta := events.get(timeout=timeout)).finish_reason is None:
        pass
    return delta, handle


def wait_idle(engine, timeout: float = 15.0) -> None:
    wait_until(lambda: engine.stats.running == 0 and engine.stats.waiting == 0, timeout)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model):
    """One engine for the tiny-model servers; small prefill chunks so a long prompt takes many steps."""
    engine = recording_engine(tiny_model, max_batch_size=32, prefill_chunk=32)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def tiny_server(tiny_engine):
    """The OpenAI server on the random tiny model, on a free 127.0.0.1 port."""
    from llama_lab import serve

    with serve(tiny_engine, port=0, log_level="warning") as server:
        yield server


@pytest.fixture(scope="module")
def backend():
    """One ``llama-lab serve --model random:tiny`` process per gateway test module."""
    from gateway_support import start_backends

    (b,) = start_backends(1)
    yield b
    b.stop()


@pytest.fixture(scope="session")
def default_server(default_model):
    """The OpenAI server on the embedded SmolLM2 (trained weights: it stops on its own)."""
    from llama_lab import serve

    with serve(default_model, port=0, log_level="warning") as server:
        yield server


@pytest.fixture
def http(tiny_server):
    with httpx.Client(base_url=tiny_server.url, timeout=120) as client:
        yield client


@pytest.fixture
def cli_server():
    """Start ``python -m llama_lab serve ARGS --port N`` as a real process (the shared launcher); wait for /health."""
    servers: list[ServerProcess] = []

    def start(*args: str, port: int | None = None, timeout: float = 120.0) -> tuple[ServerProcess, str]:
        server = ServerProcess(llama_lab_command("serve", *args), port=port, cwd=ROOT, startup_timeout_s=timeout)
        servers.append(server)
        try:
            server.start()
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(str(exc)) from None
        return server, server.url

    yield start
    for server in servers:
        server.stop()


def run_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``python -m llama_lab ARGS`` to completion (for flags that must fail fast)."""
    return subprocess.run([sys.executable, "-m", "llama_lab", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
