"""CORS for the server and the gateway: local web clients always, other origins by setting.

NextChat's browser build calls the endpoint straight from the page and sends a preflight; a 405
there shows the user "Failed to fetch".
"""

from __future__ import annotations

from typing import Any, Sequence

# localhost / 127.0.0.1 / [::1] on any port, over http(s) or the desktop app's tauri scheme.
LOCAL_ORIGIN_REGEX = r"^(https?|tauri)://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$"


def install_cors(app: Any, origins: Sequence[str], methods: Sequence[str]) -> None:
    """Allow local origins plus ``origins`` (``*`` allows every origin)."""
    from fastapi.middleware.cors import CORSMiddleware

    any_origin = "*" in origins
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"] if any_origin else list(origins),
        allow_origin_regex=None if any_origin else LOCAL_ORIGIN_REGEX,
        allow_methods=list(methods), allow_headers=["*"], max_age=600,
    )
