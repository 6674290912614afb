"""Settings are declared once: flags and env vars take the same comma-separated lists."""

from __future__ import annotations

from llama_lab.gateway.settings import GatewaySettings
from llama_lab.server.settings import ServerSettings


def test_lists_from_env_vars_split_on_commas(monkeypatch):
    monkeypatch.setenv("LLAMA_LAB_MODEL_NAME", "llama-3-chinese, gpt-4o-mini")
    monkeypatch.setenv("LLAMA_LAB_CORS_ORIGINS", "*")
    monkeypatch.setenv("LLAMA_LAB_GATEWAY_CORS_ORIGINS", "https://a.example,https://b.example")
    server = ServerSettings()
    assert server.model_name == ["llama-3-chinese", "gpt-4o-mini"]
    assert server.cors_origins == ["*"]
    assert GatewaySettings().cors_origins == ["https://a.example", "https://b.example"]


def test_lists_from_python_and_flags():
    assert ServerSettings(model_name="a,b").model_name == ["a", "b"]
    assert ServerSettings(model_name=["c"]).model_name == ["c"]
    assert "tauri://localhost" in ServerSettings().cors_origins


def test_billing_unit_from_env_var_and_python(monkeypatch):
    monkeypatch.setenv("LLAMA_LAB_TOKENS_PER_USD", "1000")
    assert ServerSettings().tokens_per_usd == 1000
    assert ServerSettings(tokens_per_usd=7).tokens_per_usd == 7
