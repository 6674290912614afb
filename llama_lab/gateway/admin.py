"""A Python client for a running gateway's admin API, for notebooks, scripts and the CLI."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import BaseModel, ValidationError

from llama_lab.gateway.schemas import (
    CHANNELS,
    TOKENS,
    ChannelOut,
    ChannelTestResult,
    LogFilter,
    LogOut,
    Resource,
    TokenCreated,
    TokenOut,
    to_unix,  # noqa: F401  (re-exported: expiry as unix seconds)
)

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_URL = "http://127.0.0.1:3030"


class GatewayAdminError(RuntimeError):
    """The gateway refused an admin call; ``message`` is its explanation."""

    def __init__(self, status: int, message: str, field: tuple[str, ...] = (), reason: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.field = field  # where a value was refused before sending (("model_limits", "m", "rpm")), so
        self.reason = reason  # the CLI can name its flag beside pydantic's reason


def validated(model: type[BaseModel], **fields: Any) -> BaseModel:
    """``model(**fields)``, refused here with the message the gateway would give (HTTP 400).

    ``None`` for a field that cannot be null means "the default", as it does in a PATCH.
    """
    fields = {k: v for k, v in fields.items() if v is not None or _accepts_none(model, k)}
    try:
        return model(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        raise GatewayAdminError(400, f"invalid value for '{where}': {err['msg']}" if where else err["msg"],
                                field=tuple(str(p) for p in err.get("loc", ())), reason=err["msg"]) from None


def _accepts_none(model: type[BaseModel], name: str) -> bool:
    info = model.model_fields.get(name)
    return info is None or not info.is_required() and info.default is None


class Gateway:
    """Admin calls over HTTP: ``Gateway(url, admin_key).add_token("alice", quota=10_000).key``.

    Keyword arguments are the fields of ``ChannelIn`` / ``TokenIn`` (``TokenPatch`` etc. for updates),
    validated here before they are sent.
    """

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

    # -- the CRUD shape of every collection (CHANNELS, TOKENS; the CLI calls these) -------
    def add_item(self, res: Resource, **fields: Any) -> Any:
        data = validated(res.create, **fields)
        return res.created.model_validate(self._call("POST", f"/api/{res.path}", json=data.model_dump(mode="json")))

    def list_items(self, res: Resource) -> list[Any]:
        return [res.out.model_validate(item) for item in self._call("GET", f"/api/{res.path}")]

    def get_item(self, res: Resource, item_id: int) -> Any:
        return res.out.model_validate(self._call("GET", f"/api/{res.path}/{item_id}"))

    def update_item(self, res: Resource, item_id: int, **fields: Any) -> Any:
        body = validated(res.patch, **fields).model_dump(mode="json", exclude_unset=True)
        return res.out.model_validate(self._call("PATCH", f"/api/{res.path}/{item_id}", json=body))

    def delete_item(self, res: Resource, item_id: int) -> None:
        self._call("DELETE", f"/api/{res.path}/{item_id}")

    # -- channels -------------------------------------------------------------------------
    def add_channel(self, name: str, base_url: str, **fields: Any) -> ChannelOut:
        """Add a backend; ``fields``: api_key, models, model_mapping, priority, weight, enabled."""
        return self.add_item(CHANNELS, name=name, base_url=base_url, **fields)

    def channels(self) -> list[ChannelOut]:
        return self.list_items(CHANNELS)

    def update_channel(self, channel_id: int, **fields: Any) -> ChannelOut:
        return self.update_item(CHANNELS, channel_id, **fields)

    def enable_channel(self, channel_id: int, enabled: bool = True) -> ChannelOut:
        return self.update_channel(channel_id, enabled=enabled)

    def disable_channel(self, channel_id: int) -> ChannelOut:
        return self.update_channel(channel_id, enabled=False)

    def delete_channel(self, channel_id: int) -> None:
        self.delete_item(CHANNELS, channel_id)

    def test_channel(self, channel_id: int) -> ChannelTestResult:
        return ChannelTestResult.model_validate(self._call("POST", f"/api/channels/{channel_id}/test"))

    # -- tokens ---------------------------------------------------------------------------
    def add_token(self, name: str, **fields: Any) -> TokenCreated:
        """Create a token (``fields``: models, expires_at as unix seconds / datetime / timedelta, quota,
        enabled, subnets, rpm_limit, tpm_limit, model_limits, max_parallel, budget_period, lifetime_cap);
        the returned ``.key`` is the only time the key is shown."""
        return self.add_item(TOKENS, name=name, **fields)

    def tokens(self) -> list[TokenOut]:
        return self.list_items(TOKENS)

    def token(self, token_id: int) -> TokenOut:
        return self.get_item(TOKENS, token_id)

    def update_token(self, token_id: int, **fields: Any) -> TokenOut:
        return self.update_item(TOKENS, token_id, **fields)

    def delete_token(self, token_id: int) -> None:
        self.delete_item(TOKENS, token_id)

    # -- logs -----------------------------------------------------------------------------
    def logs(self, **filters: Any) -> list[LogOut]:
        """Newest first; filters are ``LogFilter`` fields: token_id, channel_id, model, status, since, until,
        limit, offset."""
        params = validated(LogFilter, **filters).model_dump(exclude_none=True)
        return [LogOut.model_validate(r) for r in self._call("GET", "/api/logs", params=params)]

    def logs_frame(self, **filters: Any) -> pd.DataFrame:
        """The logs as a pandas DataFrame with a datetime column, ready to plot."""
        import pandas as pd

        frame = pd.DataFrame([r.model_dump() for r in self.logs(**filters)], columns=list(LogOut.model_fields))
        frame["time"] = pd.to_datetime(frame["time"], unit="s")
        return frame
