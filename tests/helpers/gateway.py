"""Shared helpers for the gateway tests: real backend processes and in-process gateways on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
from sqlalchemy import create_engine, func, select, text

from llama_lab.gateway.store import LogRow, Store
from llama_lab.web.launcher import ServerProcess, free_port, llama_lab_command, wait_healthy  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
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

    def chat_calls(self) -> int:
        """``POST /v1/chat/completions`` requests this backend has answered (its /metrics counter)."""
        metrics = httpx.get(self.url + "/metrics", timeout=5).text
        pattern = r'^llama_lab_requests_total\{[^}]*path="/v1/chat/completions"[^}]*\} ([0-9.e+]+)$'
        return int(sum(float(v) for v in re.findall(pattern, metrics, flags=re.M)))


class GatewayProcess(ServerProcess):
    """``python -m llama_lab gateway --db DB ...`` as a real process (SIGKILL it to simulate a crash)."""

    def __init__(self, db: str, *args: str, port: int | None = None) -> None:
        super().__init__(llama_lab_command("gateway", "--db", db, "--admin-key", ADMIN_KEY, "--log-level", "warning", *args),
                         port=port, cwd=ROOT, startup_timeout_s=60.0, name="gateway")
        self.admin_key = ADMIN_KEY


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


class StallingServer:
    """A TCP peer that accepts connections and never answers: a backend stuck before its first byte."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self._conns.append(self._sock.accept()[0])

    def close(self) -> None:
        self._sock.close()
        for conn in self._conns:
            conn.close()


PG_URL = os.environ.get("LLAMA_LAB_TEST_PG_URL")


@contextlib.contextmanager
def pg_schema_url() -> Iterator[str]:
    """A fresh PostgreSQL schema (dropped afterwards), so tests never see each other's rows."""
    assert PG_URL, "set LLAMA_LAB_TEST_PG_URL (see .ci/postgres.sh)"
    schema = f"gw_{uuid.uuid4().hex[:12]}"
    engine = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


class QuotaProbe:
    """Reads a token's accounting straight from the gateway's database (what no API shows: reservations)."""

    def __init__(self, db: str) -> None:
        self.engine = create_engine(db)

    def state(self, token_id: int) -> tuple[int, int, int | None]:
        """``(used, reserved, quota)``."""
        with self.engine.connect() as conn:
            used, reserved, quota = conn.execute(
                text("SELECT used, reserved, quota FROM tokens WHERE id = :id"), {"id": token_id}).one()
        return int(used), int(reserved), quota

    def reservations(self, token_id: int) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text("SELECT COUNT(*) FROM reservations WHERE token_id = :id"), {"id": token_id}).scalar())

    def close(self) -> None:
        self.engine.dispose()


def logged_tokens(store: Store, token_id: int) -> int:
    """The tokens the request log holds for a token: its ``used`` counter must equal this once requests settle."""
    query = select(func.coalesce(func.sum(LogRow.total_tokens), 0)).where(LogRow.token_id == token_id)
    with store.engine.connect() as conn:
        return int(conn.scalar(query))


class BusyServer:
    """An OpenAI-shaped backend that always answers 429 (its queue is full), with a ``retry-after``."""

    def __init__(self, retry_after: str = "7") -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        body = json.dumps({"error": {"message": "the server is busy", "type": "rate_limit_error",
                                     "param": None, "code": "rate_limit_exceeded"}}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's spelling)
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(429)
                self.send_header("content-type", "application/json")
                self.send_header("retry-after", retry_after)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 -- the health probe: it is up, just busy
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"object": "list", "data": []}')

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def fire_chats(urls: list[str], key: str, bodies: list[dict]) -> list[httpx.Response]:
    """Send every chat body at once, spread round-robin over ``urls`` (gateways sharing one database)."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(
            client.post(urls[i % len(urls)] + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
            for i, body in enumerate(bodies)
        ))
