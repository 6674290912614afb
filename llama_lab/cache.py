"""Where llama_lab keeps what it makes once per machine: converted models, built kernels, compiled steps."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

MARKER = "llama_lab.json"  # written last into a cached directory: present means complete


def cache_root() -> Path:
    """``LLAMA_LAB_CACHE`` if set, else the platform's cache dir (``~/.cache/llama_lab`` on Linux)."""
    env = os.environ.get("LLAMA_LAB_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("llama_lab"))


def is_complete(target: Path) -> bool:
    return (target / MARKER).is_file()


@contextlib.contextmanager
def published_dir(target: Path) -> Iterator[Path]:
    """A temporary sibling of ``target`` to fill; renamed into place when the block ends without error.

    The block must write ``MARKER`` last. A crash mid-write never leaves a directory that later loads
    as garbage; an incomplete ``target`` left by something else is replaced; losing the rename to
    another process that published the same thing is fine.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists() and not is_complete(target):
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
