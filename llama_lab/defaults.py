"""Sampling defaults, declared once: what a request that leaves a field out gets.

The server's settings (``--default-max-tokens`` …), the protocol's ``Defaults`` and the engine's
``SamplingParams`` all derive theirs from here, so a notebook's ``engine.chat`` answers like the
server. It imports nothing (the settings and the CLI must not pull in torch).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    max_tokens: int = 2048  # a cap for clients that never stop (NextChat's desktop build), not a target
    temperature: float = 0.7
    top_p: float = 0.9


DEFAULTS = SamplingDefaults()
