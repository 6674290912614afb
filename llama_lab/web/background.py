"""A uvicorn server on a thread of its own, for notebooks and scripts (the server and the gateway).

uvicorn runs with its own event loop, so a Jupyter kernel's loop needs no patching and the
notebook stays usable. Re-running the cell replaces the server on that port instead of failing
with "address already in use"; ``stop()`` frees the port.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

# Servers this process started, by (host, port): lets a re-run cell replace its predecessor.
_LIVE: dict[tuple[str, int], "BackgroundServer"] = {}
_LIVE_LOCK = threading.Lock()


class LogBuffer(logging.Handler):
    """Keeps the last lines of a background server's logs for ``handle.logs()``."""

    def __init__(self, capacity: int = 500) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class BackgroundServer:
    """A uvicorn server for any ASGI app, on a thread of its own (shared by the server and the gateway)."""

    def __init__(self, app: Any, host: str, port: int, *, name: str, log_level: str = "warning",
                 on_stop: Any = None, loggers: tuple[str, ...] = ("llama_lab", "uvicorn"),
                 lifespan: str = "off") -> None:
        import uvicorn

        self.app, self.host, self.name = app, host, name
        self._on_stop = on_stop
        self._log = LogBuffer()
        self._log.setLevel(log_level.upper())
        self._loggers = [logging.getLogger(n) for n in loggers]
        self._raised_levels: list[logging.Logger] = []
        for lg in self._loggers:
            lg.addHandler(self._log)
            # an unconfigured logger inherits the root's WARNING, which would hide log_level="info"
            if lg.level == logging.NOTSET and lg.getEffectiveLevel() > self._log.level:
                lg.setLevel(self._log.level)
                self._raised_levels.append(lg)
        key = (host, port)
        with _LIVE_LOCK:
            previous = _LIVE.pop(key, None)
        if previous is not None:
            logger.info("replacing the previous %s on %s:%d", previous.name, host, port)
            previous.stop()
        if port:
            _ensure_free(host, port)
        config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level,
                                access_log=False, lifespan=lifespan, timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"llama-lab-{name}-{port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive():
                self._detach_logs()
                raise RuntimeError(f"the {name} could not start on {host}:{port}; see the log above")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {name} did not start within 30 s")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1] if not port else port
        with _LIVE_LOCK:
            _LIVE[(host, self.port)] = self

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._server.should_exit

    def logs(self, last: int = 50) -> str:
        """The server's recent log lines (they are not sprayed over the notebook)."""
        return "\n".join(list(self._log.lines)[-last:])

    def stop(self) -> None:
        """Stop serving, free the port and release the engine (if this handle created it)."""
        self._server.should_exit = True
        self._thread.join(timeout=10)
        with _LIVE_LOCK:
            if _LIVE.get((self.host, self.port)) is self:
                del _LIVE[(self.host, self.port)]
        if self._on_stop is not None:
            self._on_stop()
            self._on_stop = None
        self._detach_logs()

    def _detach_logs(self) -> None:
        for lg in self._loggers:
            lg.removeHandler(self._log)
        for lg in self._raised_levels:
            lg.setLevel(logging.NOTSET)
        self._raised_levels = []

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{self.name} {state} at {self.url}>"


def _ensure_free(host: str, port: int) -> None:
    """Fail with a readable message when something else holds the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host if host not in ("", "localhost") else "127.0.0.1", port))
        except OSError as exc:
            raise OSError(f"port {port} on {host} is already in use by another program ({exc.strerror}); "
                          "pick another port or stop that program") from None
