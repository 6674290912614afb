"""Server settings, declared once: the CLI flags, the ``LLAMA_LAB_*`` env vars and the defaults."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from llama_lab.presets import LoadMode

# Browsers only: NextChat's web build on a local dev server, and the desktop app's webview origins.
DEFAULT_CORS_ORIGINS = [
    "tauri://localhost",
    "https://tauri.localhost",
    "http://tauri.localhost",
    "app://.",
]


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


# A list given as "a,b" on the command line or in an env var (NoDecode: not parsed as JSON first).
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]


class ServerSettings(BaseSettings):
    """Everything ``llama-lab serve`` can be told; each field is also a ``--flag`` and an env var."""

    model_config = SettingsConfigDict(env_prefix="LLAMA_LAB_", extra="ignore")

    model: str = Field("default", description="'default' (embedded SmolLM2-135M-Instruct), a model directory, a .gguf file, or random:<preset>",
                       json_schema_extra={"aliases": ["--base_model", "--base-model"]})
    mode: LoadMode = Field(LoadMode.FULL, description="load mode: full, 8bit, 4bit or cpu")
    gpus: str | None = Field(None, description="GPU index(es) to use, like the old demo's --gpus 0 (sets CUDA_VISIBLE_DEVICES)")
    dtype: str | None = Field(None, description="compute dtype override: bf16, fp16 or fp32 (default: automatic)")
    host: str = Field("127.0.0.1", description="address to listen on (use 0.0.0.0 only behind a firewall or tunnel)")
    port: int = Field(19327, ge=0, le=65535, description="port to listen on (0 picks a free one)")
    api_key: SecretStr | None = Field(None, description="if set, clients must send 'Authorization: Bearer <key>'")
    model_name: CommaList = Field(default_factory=list, description="name(s) to serve the model as (comma-separated); any requested name is accepted")
    cors_origins: CommaList = Field(default_factory=lambda: list(DEFAULT_CORS_ORIGINS),
                                    description="allowed browser origins (comma-separated, or '*'); localhost/127.0.0.1 on any port are always allowed")
    max_concurrency: int = Field(64, ge=1, description="requests running or waiting at once; more get 429")
    max_batch_size: int = Field(32, ge=1, description="requests decoded together in one batch")
    default_max_tokens: int = Field(2048, ge=1, description="completion cap when a request gives no max_tokens (protects against clients that never stop)")
    default_temperature: float = Field(0.7, ge=0, le=2, description="temperature when a request gives none")
    default_top_p: float = Field(0.9, gt=0, le=1, description="top_p when a request gives none")
    prefill_chunk: int = Field(512, ge=16, description="prompt tokens per prefill step (a cancel lands between steps)")
    log_level: str = Field("info", description="debug, info, warning or error")

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        value = value.lower()
        if value not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError("choose debug, info, warning or error")
        return value
