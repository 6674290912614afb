"""CORS for the server and the gateway: local web clients always, other origins by setting.

NextChat's browser build calls the endpoint straight from the page and sends a preflight; a 405
there shows the user "Failed to fetch". When that page is public (the hosted NextChat web app)
and the endpoint is 127.0.0.1 or a LAN address, Chromium adds
``Access-Control-Request-Private-Network: true`` (Private Network Access); an allowed origin is
answered ``Access-Control-Allow-Private-Network: true``, any other origin is not.
"""

from __future__ import annotations

from typing import Any, Sequence

from starlette.middleware.cors import CORSMiddleware

# localhost / 127.0.0.1 / [::1] on any port, over http(s) or the desktop app's tauri scheme.
LOCAL_ORIGIN_REGEX = r"^(https?|tauri)://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$"

_PRIVATE_NETWORK = "Access-Control-Allow-Private-Network"


class _CORS(CORSMiddleware):
    """Starlette's CORS, granting private-network access only to origins it allows.

    Starlette adds the grant to every preflight that asks, even one it refuses for its origin;
    a refused origin must not be told its page may reach this private address.
    """

    def preflight_response(self, request_headers: Any) -> Any:
        response = super().preflight_response(request_headers)
        if not self.is_allowed_origin(request_headers["origin"]) and _PRIVATE_NETWORK.lower() in response.headers:
            del response.headers[_PRIVATE_NETWORK]
        return response


def install_cors(app: Any, origins: Sequence[str], methods: Sequence[str]) -> None:
    """Allow local origins plus ``origins`` (``*`` allows every origin)."""
    any_origin = "*" in origins
    app.add_middleware(
        _CORS,
        allow_origins=["*"] if any_origin else list(origins),
        allow_origin_regex=None if any_origin else LOCAL_ORIGIN_REGEX,
        allow_methods=list(methods), allow_headers=["*"], allow_private_network=True, max_age=600,
    )
