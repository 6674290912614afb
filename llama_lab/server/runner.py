"""``llama_lab.serve()``: the OpenAI server in the background of a Jupyter kernel or a script."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llama_lab.server.settings import ServerSettings, build_engine
from llama_lab.web.background import BackgroundServer

if TYPE_CHECKING:  # imported lazily: starting a gateway must not pull in torch
    from llama_lab.engine import Engine
    from llama_lab.model import LoadedModel


class ServerHandle(BackgroundServer):
    """The OpenAI server in the background: ``.url``, ``.base_url``, ``.engine``, ``.stop()``."""

    def __init__(self, engine: Engine, settings: ServerSettings, owns_engine: bool) -> None:
        from llama_lab.server.app import create_app

        from llama_lab.engine.threads import hand_over_the_gil_sooner

        self.engine, self.settings = engine, settings
        restore_gil = hand_over_the_gil_sooner()  # the engine shares this interpreter with the notebook's cells

        def on_stop() -> None:
            restore_gil()
            if owns_engine:
                engine.close()

        super().__init__(create_app(engine, settings), settings.host, settings.port, name="llama_lab server",
                         log_level=settings.log_level, on_stop=on_stop)

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

    fields = {"host": host, "port": port, **settings}
    if mode is not None:
        fields["mode"] = mode
    if isinstance(model, str):
        fields["model"] = model
    cfg = ServerSettings(**fields)
    owns = not isinstance(model, Engine)
    engine = model if isinstance(model, Engine) else build_engine(cfg, None if isinstance(model, str) else model)
    try:
        return ServerHandle(engine, cfg, owns_engine=owns)
    except BaseException:
        if owns:
            engine.close()
        raise
