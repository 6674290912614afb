"""Shared helpers for the gateway tests: real backend processes and in-process gateways on 127.0.0.1."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from llama_lab.web.launcher import ServerProcess, free_port, llama_lab_command, wait_healthy  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "test-admin-key"


class Backend(ServerProcess):
    """``python -m llama_lab serve --model random:tiny`` in its own process (the shared launcher)."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__(llama_lab_command("serve", "--model", "random:tiny", "--host", "127.0.0.1"), port=port,
                         cwd=ROOT, startup_timeout_s=120.0, name="backend")
        self.model = "random-tiny"

    def start(self) -> Backend:
        self.spawn()
        return self

    def wait(self, timeout: float = 120.0) -> Backend:
        self.startup_timeout_s = timeout
        self.wait_ready()
        self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]
        return self

    def running_requests(self) -> int:
        return int(httpx.get(self.url + "/health", timeout=5).json().get("running", 0))



def start_backends(n: int) -> list[Backend]:
    """Start ``n`` backends in parallel (each loads in a few seconds)."""
    backends = [Backend().start() for _ in range(n)]
    return [b.wait() for b in backends]


def chat_body(model: str, max_tokens: int = 4, stream: bool = False, **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": max_tokens, "stream": stream, **extra}


def sse_data(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
