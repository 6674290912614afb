"""Run the server in the background of a Jupyter kernel or a script.

uvicorn runs in its own thread with its own event loop, so the kernel's loop needs no patching
and the notebook stays usable. Re-running the cell replaces the server on that port instead of
failing with "address already in use"; ``stop()`` frees the port and the engine thread.
"""

from __future__ import annotations

import collections
import logging
import socket
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Any

from llama_lab.settings import ServerSettings

if TYPE_CHECKING:  # imported lazily: free_port / wait_healthy must not pull in torch
    from llama_lab.engine import Engine
    from llama_lab.loading import LoadedModel

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


class ServerHandle(BackgroundServer):
    """The OpenAI server in the background: ``.url``, ``.base_url``, ``.engine``, ``.stop()``."""

    def __init__(self, engine: Engine, settings: ServerSettings, owns_engine: bool) -> None:
        from llama_lab.app import create_app

        self.engine, self.settings = engine, settings
        super().__init__(create_app(engine, settings), settings.host, settings.port, name="llama_lab server",
                         log_level=settings.log_level, on_stop=engine.close if owns_engine else None)

    @property
    def base_url(self) -> str:
        """What the ``openai`` SDK wants as ``base_url``."""
        return self.url + "/v1"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        lm = self.engine.loaded
        return (f"<llama_lab server {state} at {self.url} — model {lm.name!r} ({lm.mode.value}, {lm.device}); "
                f"OpenAI base_url={self.base_url}>")


def serve(model: "str | LoadedModel | Engine" = "default", *, port: int = 19327, host: str = "127.0.0.1",
          mode: str | None = None, **settings: Any) -> ServerHandle:
    """Start the OpenAI server in the background and return at once with a handle.

    ``model`` may be a source for ``load_model``, a ``LoadedModel`` or a running ``Engine``
    (shared engines are not closed by ``stop()``). ``port=0`` picks a free port.
    """
    from llama_lab.engine import Engine
    from llama_lab.loading import LoadedModel, load_model

    fields = {"host": host, "port": port, **settings}
    if mode is not None:
        fields["mode"] = mode
    if isinstance(model, str):
        fields["model"] = model
    cfg = ServerSettings(**fields)
    owns = not isinstance(model, Engine)
    if isinstance(model, Engine):
        engine = model
    else:
        loaded = model if isinstance(model, LoadedModel) else load_model(cfg.model, cfg.mode, device=cfg.gpus, dtype=cfg.dtype)
        engine = Engine(loaded, max_batch_size=cfg.max_batch_size, max_active=cfg.max_concurrency,
                        prefill_chunk=cfg.prefill_chunk)
    try:
        return ServerHandle(engine, cfg, owns_engine=owns)
    except BaseException:
        if owns:
            engine.close()
        raise


def _ensure_free(host: str, port: int) -> None:
    """Fail with a readable message when something else holds the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host if host not in ("", "localhost") else "127.0.0.1", port))
        except OSError as exc:
            raise OSError(f"port {port} on {host} is already in use by another program ({exc.strerror}); "
                          "pick another port or stop that program") from None


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
