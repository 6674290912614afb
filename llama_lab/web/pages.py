"""Static pages an app serves itself: the server's playground and the gateway's admin console.

Plain HTML, CSS and JavaScript shipped as package data: no build step, no CDN, so a box that
only reaches its own LAN serves them as well as one on the internet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The pages load scripts and styles from their own app only. API calls may go elsewhere: the
# playground can be pointed at another server or at a gateway.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' http: https:; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_page(app: Any, route: str, directory: Path, index: str = "index.html") -> None:
    """Serve ``directory/index`` at ``route`` and the directory's files under ``route/static/``."""
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    page_file = Path(directory) / index

    async def page() -> FileResponse:
        return FileResponse(page_file, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    app.add_api_route(route, page, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount(route.rstrip("/") + "/static", StaticFiles(directory=directory), name=f"static{route.rstrip('/')}")


def add_redirect(app: Any, route: str, target: str) -> None:
    """``GET route`` answers a redirect to ``target`` (the gateway's ``/`` to its console)."""
    from fastapi.responses import RedirectResponse

    async def redirect() -> RedirectResponse:
        return RedirectResponse(target, status_code=307)

    app.add_api_route(route, redirect, methods=["GET", "HEAD"], include_in_schema=False)
