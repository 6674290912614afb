"""A Python client for a running gateway's admin API, for notebooks, scripts and the CLI."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx

from llama_lab.gateway.schemas import ChannelOut, ChannelTestResult, LogOut, TokenCreated, TokenOut

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_URL = "http://127.0.0.1:3030"


class GatewayAdminError(RuntimeError):
    """The gateway refused an admin call; ``message`` is its explanation."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def to_unix(when: float | datetime | timedelta | None) -> float | None:
    """Expiry as unix seconds: a timestamp, a datetime, or a timedelta from now."""
    if when is None or isinstance(when, (int, float)):
        return when
    if isinstance(when, timedelta):
        return (datetime.now() + when).timestamp()
    return when.timestamp()


class Gateway:
    """Admin calls over HTTP: ``Gateway(url, admin_key).add_token("alice", quota=10_000).key``."""

    def __init__(self, url: str | None = None, admin_key: str | None = None, timeout: float = 60.0) -> None:
        self.url = (url or os.environ.get("LLAMA_LAB_GATEWAY_URL") or DEFAULT_URL).rstrip("/")
        self.admin_key = admin_key or os.environ.get("LLAMA_LAB_ADMIN_KEY") or ""
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers={"authorization": f"Bearer {self.admin_key}"})

    def __repr__(self) -> str:
        return f"Gateway({self.url!r})"

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, *, json: Any = None, params: dict | None = None) -> Any:
        try:
            resp = self._http.request(method, path, json=json, params=params)
        except httpx.ConnectError as exc:
            raise GatewayAdminError(0, f"cannot connect to the gateway at {self.url}: is it running? ({exc})") from exc
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text
            raise GatewayAdminError(resp.status_code, message)
        return resp.json()

    # -- channels -------------------------------------------------------------------------
    def add_channel(
        self,
        name: str,
        base_url: str,
        *,
        api_key: str | None = None,
        models: list[str] | tuple[str, ...] = (),
        model_mapping: dict[str, str] | None = None,
        priority: int = 0,
        weight: int = 1,
        enabled: bool = True,
    ) -> ChannelOut:
        body = {
            "name": name, "base_url": base_url, "api_key": api_key, "models": list(models),
            "model_mapping": model_mapping or {}, "priority": priority, "weight": weight, "enabled": enabled,
        }
        return ChannelOut.model_validate(self._call("POST", "/api/channels", json=body))

    def channels(self) -> list[ChannelOut]:
        return [ChannelOut.model_validate(c) for c in self._call("GET", "/api/channels")]

    def update_channel(self, channel_id: int, **fields: Any) -> ChannelOut:
        return ChannelOut.model_validate(self._call("PATCH", f"/api/channels/{channel_id}", json=fields))

    def enable_channel(self, channel_id: int, enabled: bool = True) -> ChannelOut:
        return self.update_channel(channel_id, enabled=enabled)

    def disable_channel(self, channel_id: int) -> ChannelOut:
        return self.update_channel(channel_id, enabled=False)

    def delete_channel(self, channel_id: int) -> None:
        self._call("DELETE", f"/api/channels/{channel_id}")

    def test_channel(self, channel_id: int) -> ChannelTestResult:
        return ChannelTestResult.model_validate(self._call("POST", f"/api/channels/{channel_id}/test"))

    # -- tokens ---------------------------------------------------------------------------
    def add_token(
        self,
        name: str,
        *,
        models: list[str] | tuple[str, ...] = (),
        expires_at: float | datetime | timedelta | None = None,
        quota: int | None = None,
        enabled: bool = True,
        subnets: list[str] | tuple[str, ...] = (),
    ) -> TokenCreated:
        """Create a token; the returned ``.key`` is the only time the key is shown."""
        body = {
            "name": name, "models": list(models), "expires_at": to_unix(expires_at), "quota": quota,
            "enabled": enabled, "subnets": list(subnets),
        }
        return TokenCreated.model_validate(self._call("POST", "/api/tokens", json=body))

    def tokens(self) -> list[TokenOut]:
        return [TokenOut.model_validate(t) for t in self._call("GET", "/api/tokens")]

    def token(self, token_id: int) -> TokenOut:
        return TokenOut.model_validate(self._call("GET", f"/api/tokens/{token_id}"))

    def update_token(self, token_id: int, **fields: Any) -> TokenOut:
        if "expires_at" in fields:
            fields["expires_at"] = to_unix(fields["expires_at"])
        return TokenOut.model_validate(self._call("PATCH", f"/api/tokens/{token_id}", json=fields))

    def delete_token(self, token_id: int) -> None:
        self._call("DELETE", f"/api/tokens/{token_id}")

    # -- logs -----------------------------------------------------------------------------
    def logs(self, **filters: Any) -> list[LogOut]:
        """Newest first; filters: token_id, channel_id, model, status, since, until, limit, offset."""
        params = {k: v for k, v in filters.items() if v is not None}
        return [LogOut.model_validate(r) for r in self._call("GET", "/api/logs", params=params)]

    def logs_frame(self, **filters: Any) -> pd.DataFrame:
        """The logs as a pandas DataFrame with a datetime column, ready to plot."""
        import pandas as pd

        frame = pd.DataFrame([r.model_dump() for r in self.logs(**filters)], columns=list(LogOut.model_fields))
        frame["time"] = pd.to_datetime(frame["time"], unit="s")
        return frame
