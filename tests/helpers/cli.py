"""Running ``python -m llama_lab`` from tests, from the repository root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``python -m llama_lab ARGS`` to completion (for flags that must fail fast)."""
    return subprocess.run([sys.executable, "-m", "llama_lab", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
