"""The gateway: several OpenAI-compatible backends behind one endpoint, with tokens, quotas and failover.

Names resolve lazily so ``import llama_lab.gateway`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "serve_gateway": "llama_lab.gateway.runner",
    "GatewayHandle": "llama_lab.gateway.runner",
    "Gateway": "llama_lab.gateway.admin",
    "GatewayAdminError": "llama_lab.gateway.admin",
    "GatewaySettings": "llama_lab.gateway.settings",
    "create_gateway_app": "llama_lab.gateway.app",
    "Store": "llama_lab.gateway.store",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llama_lab.gateway' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
