"""The pages the server and the gateway serve themselves: routes, headers, assets, no CDN, no HTML injection."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
STATIC_DIRS = [ROOT / "llama_lab" / "server" / "static", ROOT / "llama_lab" / "gateway" / "static"]
ASSETS = sorted(p for d in STATIC_DIRS for p in d.iterdir())


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and attrs.get("src"):
            self.refs.append(attrs["src"])
        if tag == "link" and attrs.get("rel") == "stylesheet":
            self.refs.append(attrs["href"])


def page_refs(html: str) -> list[str]:
    parser = _Refs()
    parser.feed(html)
    return parser.refs


@pytest.fixture
def gateway(tmp_path):
    from llama_lab.gateway import serve_gateway

    with serve_gateway(port=0, db=f"sqlite:///{tmp_path / 'gw.db'}", admin_key="k") as gw:
        yield gw


def check_page(base: str, path: str, script: str) -> None:
    resp = httpx.get(base + path)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    csp = resp.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert resp.headers["x-content-type-options"] == "nosniff"
    refs = page_refs(resp.text)
    assert script in refs
    for ref in refs:
        assert ref.startswith("/"), f"{ref} is not served by the app itself"
        asset = httpx.get(base + ref)
        assert asset.status_code == 200, ref
        kind = "javascript" if ref.endswith(".js") else "css"
        assert kind in asset.headers["content-type"], (ref, asset.headers["content-type"])


def test_server_serves_the_playground_and_keeps_its_json_routes(tiny_server):
    check_page(tiny_server.url, "/", "/static/playground.js")
    assert httpx.get(tiny_server.url + "/health").json()["status"] == "ok"
    assert httpx.get(tiny_server.url + "/v1/models").json()["object"] == "list"
    missing = httpx.get(tiny_server.url + "/static/nope.js")
    assert missing.status_code == 404


def test_gateway_serves_the_console_and_keeps_its_api(gateway):
    root = httpx.get(gateway.url + "/")
    assert root.status_code == 307 and root.headers["location"] == "/admin"
    check_page(gateway.url, "/admin", "/admin/static/admin.js")
    assert httpx.get(gateway.url + "/health").json() == {"status": "ok"}
    refused = httpx.get(gateway.url + "/api/channels")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_admin_key"
    assert httpx.get(gateway.url + "/api/channels", headers={"authorization": "Bearer k"}).json() == []
    assert httpx.get(gateway.url + "/v1/models").status_code == 401


@pytest.mark.parametrize("path", [p for p in ASSETS if p.suffix == ".js"], ids=lambda p: p.name)
def test_scripts_put_data_in_the_dom_as_text_only(path):
    source = path.read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in source, f"{path.name} uses {sink}: build nodes and set textContent instead"


@pytest.mark.parametrize("path", ASSETS, ids=lambda p: p.name)
def test_nothing_is_loaded_from_another_site(path):
    source = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", source), f"{path.name} loads from another site"
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", source), f"{path.name} imports from another site"


def test_pages_ship_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for directory in STATIC_DIRS:
        package = ".".join(directory.parent.relative_to(ROOT).parts)
        assert "static/*" in config.get(package, []), f"{package}'s static/ is not package data"
        assert not [p for p in directory.iterdir() if p.is_dir()], "static/* does not take subfolders"
