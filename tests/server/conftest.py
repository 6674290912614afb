"""Server fixtures: the OpenAI server on the embedded model."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_server(default_model):
    """The OpenAI server on the embedded SmolLM2 (trained weights: it stops on its own)."""
    from llama_lab import serve

    with serve(default_model, port=0, log_level="warning") as server:
        yield server
