"""Run a gateway in the background of a notebook kernel or script, like ``llama_lab.serve``."""

from __future__ import annotations

from typing import Any

from llama_lab.gateway.admin import Gateway
from llama_lab.gateway.app import create_gateway_app
from llama_lab.gateway.settings import GatewaySettings
from llama_lab.web.background import BackgroundServer


class GatewayHandle(BackgroundServer):
    """A gateway on its own thread and event loop: ``.url``, ``.admin()``, ``.stop()``, context manager.

    Re-running the cell that started it replaces the gateway on that port instead of failing.
    """

    def __init__(self, settings: GatewaySettings, log_level: str = "warning") -> None:
        app = create_gateway_app(settings)
        self.settings = settings
        self.admin_key: str = app.state.admin_key
        # lifespan "on": the app starts its health probe and database pool there
        super().__init__(app, settings.host, settings.port, name="llama_lab gateway", log_level=log_level,
                         lifespan="on")
        settings.port = self.port

    def admin(self) -> Gateway:
        """An admin client for this gateway, already holding its admin key."""
        return Gateway(self.url, self.admin_key)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<llama_lab gateway {state} at {self.url}, db={self.settings.db}>"


def serve_gateway(host: str = "127.0.0.1", port: int = 3030, db: str | None = None, admin_key: str | None = None,
                  *, log_level: str = "warning", **settings: Any) -> GatewayHandle:
    """Start a gateway in a background thread and return once it accepts connections.

    ``port=0`` picks a free port (see ``handle.url``). Extra keyword arguments are
    :class:`GatewaySettings` fields (``max_attempts``, ``failure_threshold``, ``probe_interval`` ...).
    """
    fields: dict[str, Any] = {"host": host, "port": port, **settings}
    if db is not None:  # None = the default / env var, not "no database"
        fields["db"] = db
    if admin_key is not None:
        fields["admin_key"] = admin_key
    return GatewayHandle(GatewaySettings(**fields), log_level=log_level)
