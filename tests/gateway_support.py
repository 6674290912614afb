"""Shared helpers for the gateway tests: real backend processes and in-process gateways on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llama_lab.runner import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "test-admin-key"


class Backend:
    """``python -m llama_lab serve --model random:tiny`` in its own process."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.model = "random-tiny"

    def start(self) -> Backend:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_lab", "serve", "--model", "random:tiny", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        return self

    def wait(self, timeout: float = 120.0) -> Backend:
        assert self.proc is not None
        try:
            wait_healthy(self.url, self.proc, timeout=timeout, interval=0.1)
        except RuntimeError as exc:
            raise RuntimeError(f"backend on {self.port}: {exc}: {self.proc.stderr.read().decode()[-2000:]}") from None
        self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]
        return self

    def running_requests(self) -> int:
        return int(httpx.get(self.url + "/health", timeout=5).json().get("running", 0))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


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
