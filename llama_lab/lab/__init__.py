"""The lab room: the experiments the notebooks run (the quantization table, the stop-button
experiment and its notebook panel), and the files they read, shipped as package data so they
work from a plain ``pip install`` as well as from a checkout.
"""

from __future__ import annotations

import math
from importlib.resources import files
from pathlib import Path


def data_file(name: str) -> Path:
    """A file shipped in ``llama_lab/lab/data`` (for example ``perplexity.txt``)."""
    return Path(str(files("llama_lab.lab") / "data" / name))


def round_or_none(value: float | None, digits: int) -> float | None:
    """``round`` for report figures; NaN and None (not measured) become None in JSON and CSV."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(value, digits)
