"""CORS as browsers send it, on both apps (``llama_lab.web.cors`` serves the server and the gateway).

The hosted NextChat page (a public origin) calling 127.0.0.1 or a LAN address makes Chromium add
``Access-Control-Request-Private-Network: true`` to the preflight (Private Network Access); it
must be granted to allowed origins and to no one else.
"""

from __future__ import annotations

import httpx
import pytest

from llama_lab import serve
from llama_lab.gateway import serve_gateway

NEXTCHAT = "https://app.nextchat.dev"  # the hosted NextChat web app (its README's "Web App")
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
PRIVATE = {**PREFLIGHT, "Access-Control-Request-Private-Network": "true"}


@pytest.fixture(scope="module", params=["server", "gateway"])
def app_url(request, tiny_engine, tmp_path_factory):
    """Each app, allowing the hosted NextChat origin besides the local ones."""
    if request.param == "server":
        handle = serve(tiny_engine, port=0, cors_origins=NEXTCHAT, log_level="warning")
    else:
        db = tmp_path_factory.mktemp("gw") / "gw.db"
        handle = serve_gateway(port=0, db=f"sqlite:///{db}", admin_key="k", cors_origins=NEXTCHAT)
    with handle:
        yield handle.url


@pytest.mark.parametrize("origin", [NEXTCHAT, "http://localhost:3000", "http://127.0.0.1:5173"])
def test_private_network_preflight_from_an_allowed_origin_is_granted(app_url, origin):
    r = httpx.options(app_url + "/v1/chat/completions", headers={"Origin": origin, **PRIVATE})
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == origin
    assert r.headers["access-control-allow-private-network"] == "true"
    allowed = r.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


def test_private_network_preflight_from_another_origin_is_refused_and_not_granted(app_url):
    r = httpx.options(app_url + "/v1/chat/completions", headers={"Origin": "https://evil.example", **PRIVATE})
    assert r.status_code != 200
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-private-network" not in r.headers


def test_plain_preflight_gets_no_private_network_grant(app_url):
    r = httpx.options(app_url + "/v1/chat/completions", headers={"Origin": NEXTCHAT, **PREFLIGHT})
    assert r.status_code == 200
    assert "access-control-allow-private-network" not in r.headers


def test_the_hosted_origin_is_refused_unless_configured(tiny_server):
    r = httpx.options(tiny_server.url + "/v1/chat/completions", headers={"Origin": NEXTCHAT, **PRIVATE})
    assert r.status_code != 200
    assert "access-control-allow-private-network" not in r.headers


def test_the_hosted_page_can_read_a_chat_answer(app_url):
    """The real request after the preflight: the answer (or the gateway's refusal) carries the origin grant."""
    r = httpx.post(app_url + "/v1/chat/completions", headers={"Origin": NEXTCHAT, "Authorization": "Bearer x"},
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}, timeout=60)
    assert r.status_code in (200, 401), r.text  # the gateway refuses the unknown key, readably
    assert r.headers["access-control-allow-origin"] == NEXTCHAT
