"""Admin API shapes: the JSON contract of /api and the rows the Python API returns."""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_subnets(value: list[str] | None) -> list[str] | None:
    for net in value or []:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as exc:
            raise ValueError(f"{net!r} is not a subnet (use e.g. 192.168.1.0/24 or 10.0.0.5)") from exc
    return value


class ChannelIn(_In):
    name: str = Field(min_length=1)
    base_url: str = Field(min_length=1, description="OpenAI-compatible base URL, with or without /v1.")
    api_key: str | None = None
    models: list[str] = Field(default_factory=list, description="Models served; empty = any model.")
    model_mapping: dict[str, str] = Field(default_factory=dict, description="Requested name -> upstream name.")
    priority: int = 0
    weight: int = Field(1, ge=0)
    enabled: bool = True

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https:// (got {value!r})")
        return value


class ChannelPatch(_In):
    name: str | None = None
    base_url: str | None = None
    api_key: str | None = None
    models: list[str] | None = None
    model_mapping: dict[str, str] | None = None
    priority: int | None = None
    weight: int | None = Field(None, ge=0)
    enabled: bool | None = None


class ChannelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    base_url: str
    has_api_key: bool
    models: list[str]
    model_mapping: dict[str, str]
    priority: int
    weight: int
    enabled: bool
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


class TokenIn(_In):
    name: str = Field(min_length=1)
    models: list[str] = Field(default_factory=list, description="Allowed models; empty = all.")
    expires_at: float | None = Field(None, description="Unix seconds; null = never.")
    quota: int | None = Field(None, ge=0, description="Tokens (prompt + completion); null = unlimited.")
    enabled: bool = True
    subnets: list[str] = Field(default_factory=list, description="Allowed client subnets; empty = any.")

    check_subnets = field_validator("subnets")(_check_subnets)


class TokenPatch(_In):
    name: str | None = None
    models: list[str] | None = None
    expires_at: float | None = None
    quota: int | None = Field(None, ge=0)
    used: int | None = Field(None, ge=0, description="Set to 0 to reset a token's usage.")
    enabled: bool | None = None
    subnets: list[str] | None = None

    check_subnets = field_validator("subnets")(_check_subnets)


class TokenOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    key_hint: str
    models: list[str]
    expires_at: float | None
    quota: int | None
    used: int
    enabled: bool
    subnets: list[str]
    created_at: float


class TokenCreated(TokenOut):
    key: str = Field(description="The sk- key; shown once, only its hash is stored.")


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
