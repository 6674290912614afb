"""Gateway fixtures: a real backend server process per test module."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def backend():
    """One ``llama-lab serve --model random:tiny`` process per gateway test module."""
    from helpers.gateway import start_backends

    (b,) = start_backends(1)
    yield b
    b.stop()
