"""Server settings, declared once: the CLI flags, the ``LLAMA_LAB_*`` env vars and the defaults,
and ``build_engine``, the one way from settings to a running engine (CLI and notebooks alike)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llama_lab.defaults import DEFAULTS
from llama_lab.model.presets import LoadMode
from llama_lab.web.flags import CommaList

if TYPE_CHECKING:
    from llama_lab.engine import Engine
    from llama_lab.model import LoadedModel

logger = logging.getLogger(__name__)

# Browsers only: NextChat's web build on a local dev server, and the desktop app's webview origins.
DEFAULT_CORS_ORIGINS = [
    "tauri://localhost",
    "https://tauri.localhost",
    "http://tauri.localhost",
    "app://.",
]


class ServerSettings(BaseSettings):
    """Everything ``llama-lab serve`` can be told; each field is also a ``--flag`` and an env var."""

    model_config = SettingsConfigDict(env_prefix="LLAMA_LAB_", extra="ignore")

    model: str = Field("default", description="'default' (embedded SmolLM2-135M-Instruct), a model directory, a .gguf file, or random:<preset>",
                       json_schema_extra={"aliases": ["--base_model", "--base-model"]})
    mode: LoadMode = Field(LoadMode.AUTO, description="load mode: auto (a GGUF keeps its quantization on the CPU, "
                                                      "anything else loads in full), full, 8bit, 4bit, cpu, gguf, "
                                                      "int8 or int4 (CPU kernels)")
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
    default_max_tokens: int = Field(DEFAULTS.max_tokens, ge=1, description="completion cap when a request gives no max_tokens (protects against clients that never stop)")
    default_temperature: float = Field(DEFAULTS.temperature, ge=0, le=2, description="temperature when a request gives none")
    default_top_p: float = Field(DEFAULTS.top_p, gt=0, le=1, description="top_p when a request gives none")
    max_body_bytes: int = Field(2 * 2**20, ge=1024, description="largest request body accepted, in bytes (2 MiB holds a 128k-token prompt); larger ones get 413 before they are read or tokenized")
    tokens_per_usd: int = Field(500_000, gt=0, description="NextChat's usage panel shows dollars: this many tokens = 1 USD (One API's unit, as the gateway's)")
    prefill_chunk: int = Field(512, ge=16, description="prompt tokens per prefill step (running streams advance between steps)")
    compile: bool = Field(True, description="compile the decode step at start-up (on a CPU once per model and machine, about "
                                            "1.5 minutes for the embedded model on 2 cores, then loaded in seconds); "
                                            "--no-compile starts at once and decodes eagerly")
    compile_in_background: bool = Field(True, description="on a CPU, when the compiled step is not in the cache yet, build it "
                                                          "in a background process and answer eagerly meanwhile (/health's "
                                                          "engine.decode says which); --no-compile-in-background waits for it")
    prefix_caching: bool = Field(True, description="reuse the KV cache of a prompt's leading tokens that an earlier request "
                                                   "already computed (a chat's history, a shared system prompt); "
                                                   "--no-prefix-caching computes every prompt in full")
    kv_cache_tokens: int = Field(0, ge=0, description="KV cache size in tokens (0: every batch slot can use the whole context, "
                                                      "capped by memory)")
    threads: int = Field(0, ge=0, description="CPU threads for the model's work; 0 (automatic): the cores this process may use "
                                              "(affinity, cgroup quota), one fewer for each core other work keeps busy, "
                                              "back within seconds when it stops; a number pins it")
    log_level: str = Field("info", description="debug, info, warning or error")

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        value = value.lower()
        if value not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError("choose debug, info, warning or error")
        return value


def gpu_device(gpus: str | None) -> str | None:
    """The torch device for ``--gpus``, as the old demo meant it.

    Before CUDA starts, ``CUDA_VISIBLE_DEVICES`` is set (the process then sees only those GPUs and
    uses the first); in a process where CUDA already runs (a notebook) that would be ignored, so
    the first listed GPU is addressed directly.
    """
    if gpus is None or not gpus.strip():
        return None
    first = gpus.split(",")[0].strip()
    try:
        import torch

        cuda_started = torch.cuda.is_initialized()
    except ImportError:
        cuda_started = False
    if cuda_started:
        return f"cuda:{first}"
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus.strip()
    return "cuda:0"


def build_engine(settings: ServerSettings, loaded: "LoadedModel | None" = None) -> "Engine":
    """Load the model the settings name (unless ``loaded`` is given) and start its engine."""
    from llama_lab.engine import Engine
    from llama_lab.model import load_model

    if loaded is None:
        loaded = load_model(settings.model, settings.mode, device=gpu_device(settings.gpus), dtype=settings.dtype)
    return Engine(loaded, max_batch_size=settings.max_batch_size, max_active=settings.max_concurrency,
                  prefill_chunk=settings.prefill_chunk, compile=settings.compile, kv_cache_tokens=settings.kv_cache_tokens,
                  prefix_caching=settings.prefix_caching, threads=settings.threads,
                  compile_in_background=settings.compile_in_background)
