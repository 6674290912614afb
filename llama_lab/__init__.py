"""llama_lab: serve, profile and gateway your own Llama-family chat models.

Rooms: ``model`` (loading, presets, chat templates), ``engine`` (generation), ``server`` (the
OpenAI API), ``gateway`` (tokens, quotas, failover), ``web`` (what both HTTP apps share),
``profiling`` (the monitor), ``lab`` (the experiments the notebooks run).

Heavy libraries (torch, transformers, fastapi) are imported lazily so that
``import llama_lab`` stays fast; the public names below resolve on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "llama_lab.model",
    "LoadedModel": "llama_lab.model",
    "LoadMode": "llama_lab.model",
    "Engine": "llama_lab.engine",
    "SamplingParams": "llama_lab.engine",
    "serve": "llama_lab.server.runner",
    "ServerHandle": "llama_lab.server.runner",
    "ServerSettings": "llama_lab.server.settings",
    "Monitor": "llama_lab.profiling",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llama_lab' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
