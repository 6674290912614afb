"""The server's playground in a real Chromium: streaming, Stop that stops the engine, CORS, phone layout."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from helpers.browser import (
    DESKTOP, PHONE, Page, RequestRecorder, chromium, horizontal_overflow, metric, requires_browser, screenshot,
    wait_for,
)
from helpers.engine import steps_after_cancel

pytestmark = requires_browser

STEPS = "llama_lab_engine_steps"


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def api_server(tiny_engine):
    """A second server on the same engine, on another port: a second origin for the page to call."""
    from llama_lab.server.app import create_app
    from llama_lab.server.settings import ServerSettings
    from llama_lab.web.background import BackgroundServer

    recorder = RequestRecorder(create_app(tiny_engine, ServerSettings(port=0)))
    server = BackgroundServer(recorder, "127.0.0.1", 0, name="playground api")
    server.recorder = recorder
    yield server
    server.stop()


def point_at(page, url: str, key: str = "") -> None:
    """Fill the Connection fields as a person would and wait for the model list."""
    page.fill("#endpoint", url)
    page.fill("#api-key", key)
    page.click("#reconnect")
    page.wait_for_function("() => document.querySelector('#model').value !== ''")


def last_answer(page):
    return page.locator(".msg-assistant").last


def test_playground_streams_and_stop_stops_the_engine_within_a_step(browser, tiny_server, tiny_engine, api_server):
    tab = Page(browser)
    page = tab.page
    page.goto(tiny_server.url + "/")  # the page's origin ...
    point_at(page, api_server.url, key="any-key")  # ... and the API on another port: a cross-origin call
    assert page.input_value("#model") == tiny_engine.loaded.name

    page.fill("#temperature", "1")
    page.fill("#seed", "7")
    page.fill("#max-tokens", "1800")  # far more than the time the test waits: only Stop can end it
    page.fill("#prompt", "Tell me a very long story.")
    page.press("#prompt", "Enter")

    page.wait_for_function("() => Number(document.querySelector('#ntokens').textContent) >= 12", timeout=60_000)
    assert httpx.get(api_server.url + "/health").json()["running"] == 1
    steps_streaming = metric(api_server.url, STEPS)
    time.sleep(0.5)
    steps_before_stop = metric(api_server.url, STEPS)
    assert steps_before_stop > steps_streaming, "the engine should be decoding while the answer streams"
    assert re.fullmatch(r"\d+ ms", page.text_content("#ttft")), page.text_content("#ttft")
    assert float(page.text_content("#tps")) > 0
    assert page.is_enabled("#stop") and not page.is_enabled("#send")

    clicked = time.monotonic()
    page.click("#stop")
    page.wait_for_selector(".msg-assistant[data-outcome='stopped']")
    wait_for(lambda: httpx.get(api_server.url + "/health").json()["running"] == 0, timeout=5,
             what="the server going idle after Stop")
    idle_after_s = time.monotonic() - clicked
    steps_idle = metric(api_server.url, STEPS)
    time.sleep(1.5)
    steps_later = metric(api_server.url, STEPS)

    handle = next(h for h in reversed(tiny_engine.handles) if h.params.max_tokens == 1800)
    assert steps_after_cancel(handle) <= 1, f"the engine ran {steps_after_cancel(handle)} steps after the cancel"
    assert handle.steps_run < 1800
    assert steps_later == steps_idle, f"the engine kept stepping after Stop: {steps_idle} -> {steps_later}"
    assert idle_after_s < 3, f"the server took {idle_after_s:.1f} s to notice Stop"
    assert page.text_content("#finish") == "stopped by you"
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    # The page's own health poll shows it too.
    page.wait_for_function("() => document.querySelector('#server-summary').textContent.endsWith('idle')", timeout=6_000)

    # What the browser sent the other origin: the preflight first, then the streaming POST.
    chat = [(m, h) for m, p, h in api_server.recorder.requests if p == "/v1/chat/completions"]
    assert [m for m, _ in chat][:2] == ["OPTIONS", "POST"], chat
    preflight = chat[0][1]
    assert preflight["origin"] == tiny_server.url
    assert preflight["access-control-request-method"] == "POST"
    assert {"authorization", "content-type"} <= set(preflight["access-control-request-headers"].split(","))
    assert chat[1][1]["authorization"] == "Bearer any-key"

    screenshot(page, "playground-stopped-desktop")
    tab.assert_no_script_errors()
    tab.close()


def test_playground_shows_user_text_as_text(browser, tiny_server):
    tab = Page(browser)
    page = tab.page
    page.goto(tiny_server.url + "/")
    page.wait_for_function("() => document.querySelector('#model').value !== ''")
    page.fill("#max-tokens", "4")
    hostile = '<img src=x onerror="window.__pwned = 1"><b>bold</b>'
    page.fill("#prompt", hostile)
    page.click("#send")
    page.wait_for_selector(".msg-assistant[data-outcome]")
    assert page.locator(".msg-user .text").last.text_content() == hostile
    assert page.evaluate("document.querySelectorAll('.msg img, .msg b').length") == 0
    assert page.evaluate("window.__pwned") is None
    tab.assert_no_script_errors()
    tab.close()


def test_playground_reports_a_refused_key_and_an_unreachable_server(browser, tiny_engine):
    from llama_lab import serve
    from llama_lab.web.launcher import free_port

    with serve(tiny_engine, port=0, api_key="right-key", log_level="warning") as locked:
        tab = Page(browser)
        page = tab.page
        page.goto(locked.url + "/")
        page.wait_for_function("() => document.querySelector('#server-summary').textContent.includes('Incorrect API key')")
        page.fill("#api-key", "right-key")
        page.click("#reconnect")
        page.wait_for_function("() => document.querySelector('#model').value !== ''")
        page.fill("#api-key", "wrong-key")
        page.fill("#prompt", "hi")
        page.click("#send")
        page.wait_for_selector(".msg-assistant[data-outcome='error']")
        assert "HTTP 401: Incorrect API key" in last_answer(page).text_content()

        dead = f"http://127.0.0.1:{free_port()}"
        page.fill("#endpoint", dead)
        page.fill("#prompt", "hi")
        page.click("#send")
        page.wait_for_function("() => document.querySelectorAll('.msg-assistant[data-outcome=\"error\"]').length === 2")
        assert f"Cannot reach {dead}" in last_answer(page).text_content()
        assert "--cors-origins" in last_answer(page).text_content()
        tab.assert_no_script_errors()
        tab.close()


@pytest.mark.slow
def test_playground_real_answer_on_desktop_and_phone(browser, default_server):
    tab = Page(browser, DESKTOP)
    page = tab.page
    page.goto(default_server.url + "/")
    page.wait_for_function("() => document.querySelector('#mode').textContent !== '–'")
    assert page.text_content("#mode") == default_server.engine.loaded.mode.value
    assert page.input_value("#model") == default_server.engine.loaded.name
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "48")
    page.fill("#prompt", "What is the capital of France?")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg-assistant[data-outcome='done']", timeout=120_000)
    answer = last_answer(page).locator(".text").text_content()
    assert "Paris" in answer, answer
    assert page.text_content("#finish") == "stop"
    assert int(page.text_content("#ntokens")) > 0
    page.wait_for_function("() => document.querySelector('#server-summary').textContent.endsWith('idle')", timeout=6_000)
    screenshot(page, "playground-desktop")

    page.set_viewport_size(PHONE)
    page.wait_for_timeout(200)
    assert horizontal_overflow(page) <= 0
    send = page.locator("#send").bounding_box()
    assert send and send["x"] + send["width"] <= PHONE["width"] and send["y"] + send["height"] <= PHONE["height"]
    screenshot(page, "playground-phone", full_page=False)
    page.click("#toggle-settings")
    assert page.is_visible("#temperature") and not page.is_visible("#prompt")
    assert horizontal_overflow(page) <= 0
    screenshot(page, "playground-phone-settings")
    tab.assert_no_script_errors()
    tab.close()
