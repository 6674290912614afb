"""Shared fixtures: models are loaded once per session; servers bind free 127.0.0.1 ports.

Engines and servers decode eagerly here unless a test asks for compilation (``compile=True``,
``--compile``): compiling is tested on its own, and the rest of the suite stays fast. Subprocess
servers inherit this through ``LLAMA_LAB_COMPILE``.
"""

from __future__ import annotations

import os

os.environ.setdefault("LLAMA_LAB_COMPILE", "0")

import httpx  # noqa: E402
import pytest  # noqa: E402
from helpers.cli import ROOT  # noqa: E402
from helpers.engine import recording_engine  # noqa: E402

from llama_lab.web.launcher import ServerProcess, llama_lab_command  # noqa: E402


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


# ---------------------------------------------------------------- engines and servers


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
