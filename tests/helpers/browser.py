"""Real-browser tests: Playwright for Python driving the system's Chromium (Playwright downloads no browser here).

Tests that need the browser are marked ``requires_browser``: they skip with the reason when Chromium
(``/usr/bin/chromium``, or ``LLAMA_LAB_CHROMIUM``) or the ``playwright`` package is missing.
Screenshots go to ``data/screenshots/`` for a person to look at.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "data" / "screenshots"
CHROMIUM = os.environ.get("LLAMA_LAB_CHROMIUM", "/usr/bin/chromium")
# Root in a container needs --no-sandbox; the rest keeps Chromium from calling home on a closed network,
# where its background connections pile up.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return (f"Chromium not found at {CHROMIUM}: install it with `apt-get install -y chromium` "
                "(.ci/run does) or point LLAMA_LAB_CHROMIUM at a Chromium binary")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed: pip install -e '.[dev]'"
    return None


requires_browser = pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium; Playwright gives every launch a fresh temporary user-data dir."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class Page:
    """A browser page that remembers uncaught script errors, so a test can insist there were none."""

    def __init__(self, browser: Any, viewport: dict[str, int] = DESKTOP) -> None:
        self.context = browser.new_context(viewport=viewport)
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def close(self) -> None:
        self.context.close()

    def assert_no_script_errors(self) -> None:
        assert not self.errors, f"uncaught errors in the page: {self.errors}"


def screenshot(page: Any, name: str, full_page: bool = True) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def horizontal_overflow(page: Any) -> int:
    """Pixels the page is wider than its viewport (0 = nothing to scroll sideways)."""
    return int(page.evaluate("document.documentElement.scrollWidth - window.innerWidth"))


def metric(url: str, name: str) -> float:
    """One unlabelled sample from a server's Prometheus ``/metrics``."""
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)}(?:_total)? ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in {url}/metrics"
    return float(match.group(1))


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(interval)


class RequestRecorder:
    """ASGI wrapper that notes every HTTP request (method, path, headers) before the real app answers it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[tuple[str, str, dict[str, str]]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            self.requests.append((scope["method"], scope["path"], headers))
        await self.app(scope, receive, send)
