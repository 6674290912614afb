"""Shared fixtures: models are loaded once per session; servers bind free 127.0.0.1 ports."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model():
    """Random-weight tiny Llama with the real SmolLM2 tokenizer: loads in well under a second."""
    from llama_lab import load_model

    return load_model("random:tiny")


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct (converted once to the cache, then ~1 s)."""
    from llama_lab import load_model

    return load_model("default")
