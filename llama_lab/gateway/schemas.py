"""Admin API shapes: the one declaration of channel, token and log-filter fields.

The REST routes, the Python client (``Gateway``) and the CLI flags all derive from these models.
A field whose command-line spelling is not the plain ``--field-name`` carries ``Cli`` metadata
(``web.flags``); pydantic ignores it, the CLI builder reads it.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal, Optional

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, computed_field, create_model,
                      field_validator, model_validator)

from llama_lab.web.flags import Cli, split_commas

# -- value parsers shared by the models and the command line ---------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _when(text: str, sign: int) -> float | None:
    text = text.strip().lower()
    if text in ("never", "none", "null", ""):
        return None
    if m := _DURATION.match(text):
        return time.time() + sign * float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"{text!r}: use never, 30d, 12h, 2026-12-31 or unix seconds") from None


def parse_expiry(text: str) -> float | None:
    """'never', a duration from now ('30d', '12h'), a date ('2026-12-31'), or unix seconds."""
    return _when(text, +1)


def parse_since(text: str) -> float | None:
    """A duration *ago* ('1h'), a date, or unix seconds: for log filters."""
    return _when(text, -1)


def parse_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise ValueError(f"want REQUESTED=UPSTREAM, got {text!r}")
    return name, value


def parse_model_limit(text: str) -> tuple[str, dict[str, int]]:
    """``MODEL=rpm:N,tpm:M`` (either or both) -> ``(MODEL, {"rpm": N, "tpm": M})``.

    The model is split off at the last ``=``, so names with ``:`` or ``/`` (``llama3:8b``) stay whole.
    """
    model, sep, spec = text.rpartition("=")
    parts = [part.partition(":") for part in split_commas(spec)] if sep and model else []
    if not parts or any(kind.strip() not in ("rpm", "tpm") or not number.strip().isdigit() for kind, _, number in parts):
        raise ValueError(f"want MODEL=rpm:N,tpm:M (either or both), got {text!r}")
    return model, {kind.strip(): int(number) for kind, _, number in parts}


PERIODS = ("daily", "weekly", "monthly")


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """The UTC calendar period (``daily``, ``weekly`` from Monday, ``monthly``) holding ``now``: (start, end)."""
    day = datetime.fromtimestamp(now, timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        start, end = day, day + timedelta(days=1)
    elif period == "weekly":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    elif period == "monthly":
        start = day.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown budget period {period!r}")
    return start.timestamp(), end.timestamp()


def to_unix(when: Any) -> Any:
    """Expiry as unix seconds: a timestamp, a datetime, or a timedelta from now (other values: pydantic decides)."""
    if isinstance(when, timedelta):
        return (datetime.now() + when).timestamp()
    if isinstance(when, datetime):
        return when.timestamp()
    return when


def _check_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https:// (got {value!r})")
    return value


def _check_subnets(value: list[str] | None) -> list[str] | None:
    for net in value or []:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as exc:
            raise ValueError(f"{net!r} is not a subnet (use e.g. 192.168.1.0/24 or 10.0.0.5)") from exc
    return value


def _clamp(low: int, high: int) -> AfterValidator:
    """Out-of-range paging values are clamped, not refused (what the API always did)."""
    return AfterValidator(lambda v: max(low, min(v, high)))


# What the database columns hold: INTEGER is 32-bit on PostgreSQL; quotas are BIGINT, with headroom
# for used + reserved. A bigger number is refused (400) instead of failing in the driver (500).
INT32 = 2**31 - 1
BIG = 2**62


def _no_nul(value: Any) -> Any:
    """PostgreSQL text cannot hold NUL: refuse it here (400) rather than in the driver (500)."""
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("must not contain NUL (\\x00) characters")
    if isinstance(value, (list, tuple)):
        for item in value:
            _no_nul(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_nul(key)
            _no_nul(item)
    return value


# -- channels ------------------------------------------------------------------------------------


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")

    no_nul = field_validator("*")(_no_nul)


class _Stored(BaseModel):
    """What every stored row has first (``id`` leads the JSON and the CLI tables)."""

    model_config = ConfigDict(from_attributes=True)

    id: int


class ChannelFields(BaseModel):
    """The channel fields an admin sets (and reads back)."""

    name: str = Field(min_length=1, description="A label for lists, logs and error messages, e.g. gpu.")
    base_url: Annotated[str, AfterValidator(_check_url)] = Field(
        min_length=1, json_schema_extra={"pattern": "^https?://"},
        description="OpenAI-compatible base URL, with or without /v1, e.g. http://192.168.1.20:19327/v1.",
    )
    models: Annotated[list[str], Cli(parse=split_commas, metavar="A,B")] = Field(
        default_factory=list, description="Models served, comma-separated on the CLI; empty = any model."
    )
    model_mapping: Annotated[
        dict[str, str], Cli(flag="--map", parse=parse_pair, repeat=True, metavar="REQUESTED=UPSTREAM")
    ] = Field(
        default_factory=dict, description="Requested name -> upstream name (--map is repeatable)."
    )
    priority: int = Field(0, ge=-INT32, le=INT32, description="Higher is tried first.")
    weight: int = Field(1, ge=0, le=INT32, description="Share of traffic among channels of equal priority; 0 = spare.")
    enabled: Annotated[bool, Cli(on="--enable", off="--disable")] = Field(True, description="Route requests to it.")


class ChannelIn(ChannelFields, _In):
    api_key: str | None = Field(None, description="Key the backend expects (sent upstream as Bearer; never returned).")


class ChannelOut(ChannelFields, _Stored):
    has_api_key: bool
    auto_disabled: bool
    disabled_reason: str | None
    last_test_at: float | None
    last_test_latency_ms: float | None
    created_at: float


class Channel(ChannelOut):
    """A channel as the router sees it, upstream key included (never sent over /api)."""

    api_key: str | None

    def serves(self, model: str) -> bool:
        return not self.models or model in self.models or model in self.model_mapping

    def upstream_model(self, model: str) -> str:
        return self.model_mapping.get(model, model)


# -- tokens --------------------------------------------------------------------------------------


class ModelLimit(BaseModel):
    """A token's own limits on one model, checked in the same admission as the token's."""

    model_config = ConfigDict(extra="forbid")

    rpm: Optional[int] = Field(None, ge=1, le=INT32, description="Requests per minute on this model; null = none.")
    tpm: Optional[int] = Field(None, ge=1, le=BIG, description="Tokens per minute on this model; null = none.")

    @model_validator(mode="after")
    def _some_limit(self) -> ModelLimit:
        if self.rpm is None and self.tpm is None:
            raise ValueError("give rpm, tpm or both (a model without limits needs no entry)")
        return self


def _check_model_limits(value: dict[str, ModelLimit] | None) -> dict[str, ModelLimit] | None:
    for model in value or {}:
        if not model or len(model) > 200:
            raise ValueError(f"{model!r}: a model name is 1 to 200 characters")
    return value or None  # {} and null both mean "no per-model limits"


class TokenFields(BaseModel):
    """The token fields an admin sets (and reads back)."""

    name: str = Field(min_length=1, description="Who or what uses it, e.g. alice; shown in logs and errors.")
    models: Annotated[list[str], Cli(parse=split_commas, metavar="A,B")] = Field(
        default_factory=list, description="Allowed models, comma-separated on the CLI; empty = all."
    )
    expires_at: Annotated[
        Optional[float], BeforeValidator(to_unix), Cli(flag="--expires", parse=parse_expiry, metavar="WHEN")
    ] = Field(
        None, description="Unix seconds (the Python client also takes a datetime or timedelta; the CLI never, 30d, 12h, "
        "2026-12-31); null = never."
    )
    quota: Annotated[Optional[int], Cli(none="--unlimited")] = Field(
        None, ge=0, le=BIG, description="Tokens (prompt + completion) it may use; null (--unlimited) = no limit."
    )
    enabled: Annotated[bool, Cli(on="--enable", off="--disable")] = Field(True, description="Accept requests with it.")
    subnets: Annotated[list[str], AfterValidator(_check_subnets), Cli(flag="--subnet", repeat=True, metavar="CIDR")] = Field(
        default_factory=list, description="Allowed client subnets, e.g. 192.168.1.0/24 (--subnet is repeatable); empty = any."
    )
    rpm_limit: Annotated[Optional[int], Cli(flag="--rpm", none="--no-rpm")] = Field(
        None, ge=1, le=INT32, description="Requests it may start per minute, across every gateway on the database; "
        "null = no limit."
    )
    tpm_limit: Annotated[Optional[int], Cli(flag="--tpm", none="--no-tpm")] = Field(
        None, ge=1, le=BIG, description="Tokens (prompt + completion) it may use per minute, across every gateway: a "
        "request counts its worst case when admitted and its real usage once it ends; null = no limit."
    )
    model_limits: Annotated[
        Optional[dict[str, ModelLimit]], AfterValidator(_check_model_limits),
        Cli(flag="--model-limit", parse=parse_model_limit, repeat=True, none="--no-model-limits",
            metavar="MODEL=rpm:N,tpm:M"),
    ] = Field(
        None, description="Limits per requested model, on top of the token's: {model: {rpm, tpm}} (--model-limit is "
        "repeatable; given, it replaces the whole mapping); null = none."
    )
    max_parallel: Annotated[Optional[int], Cli(flag="--max-parallel", none="--no-max-parallel")] = Field(
        None, ge=1, le=INT32, description="Requests it may have in flight at once, across every gateway; null = no limit."
    )
    budget_period: Annotated[Optional[Literal["daily", "weekly", "monthly"]], Cli(flag="--period", none="--no-period")] = Field(
        None, description="The quota is per period: used goes back to 0 at each UTC day, week (Monday) or month; "
        "null = the quota is for the token's lifetime."
    )
    lifetime_cap: Annotated[Optional[int], Cli(flag="--lifetime-cap", none="--no-lifetime-cap")] = Field(
        None, ge=0, le=BIG, description="Tokens it may use over all periods together; null = no cap."
    )


class TokenIn(TokenFields, _In):
    pass


class TokenOut(TokenFields, _Stored):
    key_hint: str
    used: int
    used_total: int = Field(0, description="Tokens used over all periods (what lifetime_cap caps).")
    in_flight: int = Field(0, description="Requests in flight now (counted for tokens with a quota or a limit).")
    period_start: Optional[float] = Field(None, description="Unix seconds: when the current budget period began.")
    created_at: float

    @computed_field(description="Unix seconds: when used next goes back to 0 (null without a budget period).")
    @property
    def next_reset_at(self) -> Optional[float]:
        if self.budget_period is None:
            return None
        return period_bounds(self.budget_period, time.time())[1]


class TokenCreated(TokenOut):
    key: str = Field(description="The sk- key; shown once, only its hash is stored.")


# -- PATCH bodies: every field of the creation model, optional -----------------------------------


def patch_model(model: type[BaseModel], name: str, **extra: Any) -> type[BaseModel]:
    """``model`` with every field optional (``None`` = leave as is), plus ``extra`` fields.

    Constraints, validators and ``Cli`` metadata are kept, so a PATCH validates like a POST.
    """
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        annotation = Annotated[(Optional[info.annotation], *info.metadata)] if info.metadata else Optional[info.annotation]
        fields[field_name] = (annotation, Field(None, description=info.description))
    patch = create_model(name, __base__=_In, __module__=__name__, **fields, **extra)
    patch.__doc__ = f"A PATCH of a {model.__name__.removesuffix('In').lower()}: only the fields given change."
    return patch


def nullable_fields(model: type[BaseModel]) -> frozenset[str]:
    """Fields whose ``None`` means "clear it" rather than "leave it" (``quota``, ``expires_at``, ``api_key``)."""
    return frozenset(n for n, info in model.model_fields.items() if not info.is_required() and info.default is None)


ChannelPatch = patch_model(ChannelIn, "ChannelPatch")
TokenPatch = patch_model(
    TokenIn, "TokenPatch",
    used=(Optional[int], Field(None, ge=0, le=BIG, description="Set the used count (0 resets a token's usage).")),
)


@dataclass(frozen=True)
class Resource:
    """One admin collection under ``/api``: the models its routes, the client and the CLI share."""

    name: str  # "channel": in messages, CLI subcommands and store method names
    path: str  # "channels": /api/<path>
    create: type[BaseModel]
    patch: type[BaseModel]
    out: type[BaseModel]
    created: type[BaseModel]  # what POST answers (a token's key is shown once, there)


CHANNELS = Resource("channel", "channels", ChannelIn, ChannelPatch, ChannelOut, ChannelOut)
TOKENS = Resource("token", "tokens", TokenIn, TokenPatch, TokenOut, TokenCreated)


# -- logs ----------------------------------------------------------------------------------------


class LogFilter(BaseModel):
    """Which request-log rows to show: the query of ``GET /api/logs``, the store's filter, the CLI's flags."""

    token_id: Annotated[Optional[int], Cli(flag="--token", metavar="ID")] = Field(
        None, ge=-INT32, le=INT32, description="Only this token's requests.")
    channel_id: Annotated[Optional[int], Cli(flag="--channel", metavar="ID")] = Field(
        None, ge=-INT32, le=INT32, description="Only this channel's requests.")
    model: Optional[str] = Field(None, description="Only requests for this model.")
    status: Optional[int] = Field(None, ge=-INT32, le=INT32, description="Only this HTTP status (499 = client went away).")
    since: Annotated[Optional[float], Cli(parse=parse_since, metavar="WHEN")] = Field(
        None, description="From this time: unix seconds (the CLI also takes a date or 1h = an hour ago)."
    )
    until: Annotated[Optional[float], Cli(parse=parse_since, metavar="WHEN")] = Field(
        None, description="Before this time, like since.")
    no_nul = field_validator("*")(_no_nul)

    limit: Annotated[int, _clamp(1, 10_000), Cli(default=20)] = Field(100, description="At most this many rows (1 to 10000).")
    offset: Annotated[int, _clamp(0, INT32)] = Field(0, description="Skip this many rows (newest first).")


class LogOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    time: float
    token_id: int | None
    token_name: str | None
    channel_id: int | None
    channel_name: str | None
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    latency_ms: float
    first_byte_ms: float | None
    status: int
    stream: bool
    error: str | None


class ChannelTestResult(BaseModel):
    channel_id: int
    name: str
    ok: bool
    model: str | None = None
    latency_ms: float | None = None
    status_code: int | None = None
    error: str | None = None
