"""Gateway settings: one declaration gives the CLI flag, the env var and the default."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from llama_lab.web.flags import CommaList


def default_db_url() -> str:
    """A SQLite file in the user's data dir, so the gateway's state survives restarts."""
    data_dir = Path(platformdirs.user_data_dir("llama-lab"))
    return f"sqlite:///{data_dir / 'gateway.db'}"


class GatewaySettings(BaseSettings):
    """Everything the gateway reads; env vars are ``LLAMA_LAB_GATEWAY_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="LLAMA_LAB_GATEWAY_", populate_by_name=True, extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(3030, description="Port to listen on.")
    db: str = Field(default_factory=default_db_url, description="SQLAlchemy URL (SQLite file or postgresql+psycopg://...).")
    admin_key: str | None = Field(
        None,
        validation_alias=AliasChoices("LLAMA_LAB_ADMIN_KEY", "LLAMA_LAB_GATEWAY_ADMIN_KEY"),
        description="Key for the /api admin routes (env LLAMA_LAB_ADMIN_KEY); generated and logged when unset.",
    )
    cors_origins: CommaList = Field(
        default_factory=list,
        description="Extra browser origins allowed (e.g. https://chat.example.com, or * for any); local origins are always allowed.",
    )
    routing: Literal["weighted", "least-busy", "latency"] = Field(
        "weighted",
        description="Order of the channels inside a priority: weighted (random by weight), least-busy (fewest requests in "
        "flight, over every gateway on the database) or latency (lowest recent time to first byte).",
    )
    load_refresh: float = Field(0.5, gt=0, description="Seconds between exchanges of in-flight counts and latencies "
                                                       "with the other gateways (least-busy and latency routing).")
    max_attempts: int = Field(3, ge=1, description="Channels tried per request before giving up (first try + retries).")
    failure_threshold: int = Field(3, ge=1, description="Consecutive failures after which a channel is disabled automatically.")
    probe_interval: float = Field(10.0, gt=0, description="Seconds between health probes of auto-disabled channels.")
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect to a backend before trying the next channel.")
    first_byte_timeout: float = Field(60.0, gt=0, description="Seconds to wait for a backend's first byte (and between stream chunks).")
    channel_cache_ttl: float = Field(2.0, ge=0, description="Seconds a process caches the channel table (other processes' edits show up after this).")
    default_max_tokens: int = Field(
        2048, ge=1,
        description="Completion cap for requests that give no max_tokens: sent upstream and reserved against the token's quota.",
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body accepted (bytes); bigger ones get 413 before they are read.",
    )
    reservation_ttl: float = Field(
        60.0, gt=0,
        description="Seconds after which quota held by a gateway that stopped (a crash) is released; running gateways renew theirs.",
    )
    tokens_per_usd: int = Field(500_000, gt=0, description="Display convention for NextChat's usage panel: this many tokens = 1 USD.")
