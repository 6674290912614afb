"""A server as a subprocess on a free 127.0.0.1 port: the one launcher for tests, benchmarks and
the stop experiment.

``ServerProcess`` starts the command, waits for ``/health``, keeps its log, measures its CPU time
and memory (with its children, so a server that forks is counted whole) and stops it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

logger = logging.getLogger(__name__)

# Servers under test never reach a model hub.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free right now (for servers started as subprocesses)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0, interval: float = 0.2) -> None:
    """Poll ``GET {url}/health`` until it answers 200.

    Raises RuntimeError as soon as ``proc`` exits (no point waiting out the timeout), and
    TimeoutError after ``timeout`` seconds.
    """
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server process exited with status {proc.returncode} before {url} answered")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/health did not answer within {timeout:.0f} s")
        time.sleep(interval)


def llama_lab_command(subcommand: str = "serve", *args: str) -> list[str]:
    """``python -m llama_lab SUBCOMMAND ARGS --port {port}`` for ``ServerProcess``."""
    return ["{python}", "-m", "llama_lab", subcommand, *args, "--port", "{port}"]


class ServerProcess:
    """A server subprocess: started, health-checked, measured, stopped, its log kept.

    ``argv`` may contain ``{port}`` and ``{python}``; ``port`` defaults to a free one.
    """

    def __init__(self, argv: Sequence[str], *, port: int | None = None, env: Mapping[str, str] | None = None,
                 threads: int | None = None, startup_timeout_s: float = 240.0, cwd: str | os.PathLike | None = None,
                 name: str | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [a.format(port=self.port, python=sys.executable) for a in argv]
        self.name = name or " ".join(self.argv[1:4])
        self.env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1", **(env or {})}
        if threads:
            self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.cwd = cwd
        self.startup_timeout_s = startup_timeout_s
        self.startup_s = float("nan")
        self._t0 = time.perf_counter()
        self._log = tempfile.NamedTemporaryFile(prefix="llama-lab-server-", suffix=".log", delete=False)
        self.popen: subprocess.Popen | None = None
        self._proc: Any = None  # psutil.Process

    @property
    def pid(self) -> int:
        assert self.popen is not None, "the server is not started"
        return self.popen.pid

    def start(self) -> "ServerProcess":
        """Launch and wait until ``/health`` answers (``spawn`` + ``wait_ready``)."""
        return self.spawn().wait_ready()

    def spawn(self) -> "ServerProcess":
        """Launch without waiting, so several servers can start side by side."""
        import psutil

        logger.info("starting %s", shlex.join(self.argv))
        self._t0 = time.perf_counter()
        self.popen = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        self._proc = psutil.Process(self.popen.pid)
        return self

    def wait_ready(self) -> "ServerProcess":
        """Wait for ``/health``; on failure the process is stopped and the error carries its log."""
        try:
            wait_healthy(self.url, self.popen, timeout=self.startup_timeout_s, interval=0.1)
        except (RuntimeError, TimeoutError) as exc:
            message = f"{self.name}: {exc}:\n{self.log()}"
            self.stop()
            raise type(exc)(message) from None
        self.startup_s = time.perf_counter() - self._t0
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would end it (failover tests)."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate (then kill) the process; the log file is removed."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:  # the old demo's non-daemon generate thread can hold its process up to max_tokens
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        if not self._log.closed:
            self._log.close()
            with contextlib.suppress(OSError):
                os.unlink(self._log.name)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def _procs(self) -> list[Any]:
        import psutil

        if self._proc is None:
            return []
        try:
            return [self._proc, *self._proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server and its children so far."""
        import psutil

        total = 0.0
        for p in self._procs():
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def rss(self) -> int:
        """Resident memory of the server and its children, in bytes."""
        import psutil

        total = 0
        for p in self._procs():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total

    def log(self, last: int = 40) -> str:
        """The last lines the server printed (kept in a temporary file until ``stop``)."""
        if self._log.closed:
            return ""
        self._log.flush()
        return "\n".join(Path(self._log.name).read_text(errors="replace").splitlines()[-last:])

    def __repr__(self) -> str:
        return f"<ServerProcess {self.name} at {self.url} {'running' if self.alive else 'stopped'}>"
