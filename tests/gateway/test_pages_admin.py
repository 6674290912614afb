"""The gateway's admin console in a real Chromium: channels, tokens, chat through the gateway, log, chart, revoke."""

from __future__ import annotations

import math
import re

import openai
import pytest

from helpers.browser import DESKTOP, PHONE, Page, chromium, horizontal_overflow, requires_browser, screenshot

pytestmark = requires_browser

ADMIN_KEY = "console-admin-key"


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def gateway(tmp_path):
    from llama_lab.gateway import serve_gateway

    with serve_gateway(port=0, db=f"sqlite:///{tmp_path / 'gateway.db'}", admin_key=ADMIN_KEY) as gw:
        yield gw


def sign_in(page, url: str, key: str = ADMIN_KEY) -> None:
    page.goto(url + "/")
    page.fill("#admin-key", key)
    page.click("#login-form button[type=submit]")


def row(page, table: str, name: str):
    return page.locator(f"#{table} tbody tr").filter(has=page.locator(".name", has_text=re.compile(f"^{re.escape(name)}$")))


def wait_rows(page, condition: str) -> None:
    """Wait until the log table has rows and every row ``r`` meets ``condition`` (a JS expression)."""
    page.wait_for_function(f"""() => {{
        const rows = [...document.querySelectorAll('#logs-table tbody tr:not(.empty)')];
        return rows.length > 0 && rows.every((r) => {condition});
    }}""")


def open_view(page, view: str) -> None:
    page.click(f".tabs a[data-view={view}]")
    page.wait_for_selector(f"#view-{view}:not([hidden])")


def add_channel(page, name: str, base_url: str, models: str, weight: int) -> None:
    page.click("#add-channel")
    form = page.locator("#channel-form")
    form.locator("[name=name]").fill(name)
    form.locator("[name=base_url]").fill(base_url)
    form.locator("[name=models]").fill(models)
    form.locator("[name=weight]").fill(str(weight))
    form.locator("button[type=submit]").click()  # "test it after saving" is on by default
    page.wait_for_selector("#channel-dialog:not([open])", state="attached")


def test_admin_console_end_to_end(browser, tiny_server, tiny_engine, gateway):
    from llama_lab.web.launcher import free_port

    model = tiny_engine.loaded.name
    admin = gateway.admin()
    tab = Page(browser, DESKTOP)
    page = tab.page
    page.on("dialog", lambda d: d.accept())  # the confirm() before revoking

    # / leads to the console; a wrong key is refused with the gateway's own words.
    sign_in(page, gateway.url, key="not-the-key")
    assert page.url == gateway.url + "/admin"
    page.wait_for_selector("#login-error:has-text('Invalid admin key')")
    assert page.is_hidden("#app")
    page.fill("#admin-key", ADMIN_KEY)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#app:not([hidden])")
    assert page.evaluate("sessionStorage.getItem('llama_lab.gateway.admin_key')") == ADMIN_KEY

    # Channels: a working one (tested on save: the measured latency) and a dead one (the reason shown).
    open_view(page, "channels")
    add_channel(page, "gpu-box", tiny_server.base_url, model, weight=3)
    gpu = row(page, "channels-table", "gpu-box")
    gpu.locator(".test-result[data-ok=true]").wait_for(timeout=60_000)
    measured = admin.channels()[0].last_test_latency_ms
    assert measured is not None and measured > 0
    # the latency is stored to 0.1 ms and the page rounds halves up (Math.round), Python's round() to even
    assert gpu.locator(".test-result .badge").text_content() == f"✓ {math.floor(measured + 0.5)} ms"

    dead_url = f"http://127.0.0.1:{free_port()}/v1"
    add_channel(page, "cpu-box", dead_url, model, weight=1)
    cpu = row(page, "channels-table", "cpu-box")
    cpu.locator(".test-result[data-ok=false]").wait_for(timeout=30_000)
    assert "connection refused" in cpu.locator(".test-result").text_content()
    assert "connection refused" in page.text_content("#banner-text")
    assert gpu.locator(".share").text_content() == "75% of the traffic it shares"  # weights 3:1
    assert cpu.locator(".share").text_content() == "25% of the traffic it shares"
    cpu.locator("button", has_text="Disable").click()
    cpu.locator(".badge", has_text="disabled").wait_for()
    assert gpu.locator(".share").text_content() == "all of its traffic"
    assert [c.enabled for c in admin.channels()] == [True, False]
    gpu.locator("button", has_text="Edit").click()
    page.locator("#channel-form [name=priority]").fill("5")
    page.locator("#channel-form button[type=submit]").click()
    gpu.locator("td[data-label=Priority]", has_text="5").wait_for()
    assert admin.channels()[0].priority == 5
    screenshot(page, "admin-channels-desktop")

    # Tokens: the key is shown once, with the settings to paste.
    open_view(page, "tokens")
    page.click("#add-token")
    form = page.locator("#token-form")
    form.locator("[name=name]").fill("alice")
    form.locator("[name=quota]").fill("100000")
    form.locator("[name=expires]").select_option("30")
    form.locator(".model-picks button", has_text=model).click()
    assert form.locator("[name=models]").input_value() == model
    form.locator("button[type=submit]").click()
    page.wait_for_selector("#key-dialog[open]")
    key = page.input_value("#new-key")
    assert re.fullmatch(r"sk-[0-9a-f]{48}", key), key
    assert page.text_content("#key-base-url") == gateway.url + "/v1"
    assert key in page.text_content("#key-curl")
    screenshot(page, "admin-token-key-desktop", full_page=False)
    page.click("#key-done")
    assert page.input_value("#new-key") == ""  # gone from the page with the dialog
    alice = row(page, "tokens-table", "alice")
    assert alice.locator(".mono").text_content() == f"{key[:7]}...{key[-4:]}"
    token = admin.tokens()[0]
    assert (token.quota, token.models) == (100000, [model])
    assert 29.9 * 86400 < token.expires_at - token.created_at < 30.1 * 86400

    # The token chats through the gateway, from the playground pointed at it (another origin).
    play = Page(browser, DESKTOP)
    chat = play.page
    chat.goto(tiny_server.url + "/")
    chat.fill("#endpoint", gateway.url)
    chat.fill("#api-key", key)
    chat.click("#reconnect")
    chat.wait_for_function("() => document.querySelector('#model').value !== ''")
    assert chat.input_value("#model") == model
    assert chat.text_content("#mode") == "–"  # a gateway does not say how its backends loaded the model
    chat.fill("#max-tokens", "12")
    chat.fill("#prompt", "Say hi.")
    chat.press("#prompt", "Enter")
    chat.wait_for_selector(".msg-assistant[data-outcome='done']", timeout=60_000)
    assert chat.locator(".msg-assistant .text").last.text_content().strip()
    screenshot(chat, "playground-through-gateway-desktop", full_page=False)

    # The log shows the request; the filters narrow it.
    logs = admin.logs()
    assert [(r.token_name, r.channel_name, r.status) for r in logs] == [("alice", "gpu-box", 200)]
    open_view(page, "logs")
    first = page.locator("#logs-table tbody tr").first
    first.wait_for()
    assert first.get_attribute("data-status") == "200"
    cells = [first.locator(f"td[data-label={label}]").text_content() for label in ("Token", "Channel", "Model")]
    assert cells == ["alice", "gpu-box", model]
    assert first.locator("td[data-label=Tokens] span").first.text_content() == str(logs[0].total_tokens)
    page.select_option("#f-status", "401")
    page.wait_for_selector("#logs-table tr.empty:has-text('No requests match')")
    page.select_option("#f-status", "")
    page.select_option("#f-token", label="alice")
    wait_rows(page, "r.querySelector('td[data-label=Token]').textContent === 'alice'")

    # Overview: the charts' totals per token and per channel are the log's.
    open_view(page, "overview")
    total = logs[0].total_tokens
    assert total > 0
    for group, name in (("token", "alice"), ("channel", "gpu-box")):
        item = page.locator(f"#legend-{group} li[data-series='{name}']")
        item.wait_for()
        assert int(item.get_attribute("data-total")) == total
        bars = page.locator(f"#chart-{group} rect[data-series='{name}']")
        assert sum(int(bars.nth(i).get_attribute("data-value")) for i in range(bars.count())) == total
    assert page.text_content("[data-stat=requests] .stat-value") == "1"
    health = row(page, "health-table", "cpu-box")
    assert health.locator(".badge").first.text_content() == "disabled"
    assert "✗ failed" in health.locator("td[data-label='Last test']").text_content()
    screenshot(page, "admin-overview-desktop")

    # A quota below the usage: the next chat is refused with a message that says so (429, not One API's 401).
    open_view(page, "tokens")
    alice.locator("button", has_text="Edit").click()
    page.locator("#token-form [name=quota]").fill("10")
    page.locator("#token-form button[type=submit]").click()
    alice.locator(".badge", has_text="quota used up").wait_for()
    assert alice.locator("td[data-label=Usage]").text_content().startswith(f"{total} of 10")
    chat.fill("#prompt", "Say hi again.")
    chat.press("#prompt", "Enter")
    chat.wait_for_function("() => document.querySelectorAll('.msg-assistant[data-outcome=\"error\"]').length === 1")
    assert f"HTTP 429: Token 'alice' has exhausted its quota: {total} of 10 tokens used" in \
        chat.locator(".msg-assistant .error").last.text_content()

    # Revoke: the playground now shows the gateway's refusal, and so does the openai SDK.
    alice.locator("button", has_text="Revoke").click()
    alice.locator(".badge", has_text="revoked").wait_for()
    assert admin.tokens()[0].enabled is False
    chat.fill("#prompt", "Say hi again.")
    chat.press("#prompt", "Enter")
    chat.wait_for_function("() => document.querySelectorAll('.msg-assistant[data-outcome=\"error\"]').length === 2")
    assert "HTTP 401: Token 'alice' is disabled" in chat.locator(".msg-assistant .error").last.text_content()
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="disabled"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    screenshot(page, "admin-tokens-desktop")

    open_view(page, "logs")
    page.click("#f-reset")  # a refused token is logged without its name (the gateway has not matched it yet)
    page.select_option("#f-status", "401")
    wait_rows(page, "r.dataset.status === '401'")
    assert page.locator("#logs-table tbody tr").count() == 2  # the playground's and the SDK's
    assert "is disabled" in page.locator("#logs-table tbody tr").first.locator("td[data-label=Error]").text_content()
    page.click("#f-reset")
    page.wait_for_selector("#logs-table tbody tr[data-status='429']")
    screenshot(page, "admin-logs-desktop")

    # A phone: every view fits the width, tables become cards.
    page.set_viewport_size(PHONE)
    for view in ("overview", "channels", "tokens", "logs"):
        open_view(page, view)
        page.wait_for_timeout(300)  # the charts redraw for the new width
        assert horizontal_overflow(page) <= 0, f"{view} scrolls sideways on a phone"
        screenshot(page, f"admin-{view}-phone")
    assert page.locator("#logs-table thead").is_hidden()
    open_view(page, "channels")
    page.click("#add-channel")
    assert page.locator("#channel-form [name=clear_key]").is_hidden()  # only when editing a channel
    box = page.locator("#channel-dialog").bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    screenshot(page, "admin-channel-form-phone", full_page=False)
    page.locator("#channel-dialog [data-close]").click()

    # Delete: the token is gone; its requests stay in the log.
    page.set_viewport_size(DESKTOP)
    open_view(page, "tokens")
    alice.locator("button", has_text="Delete").click()
    page.wait_for_selector("#tokens-table tr.empty")
    assert admin.tokens() == [] and len(admin.logs()) == 4

    tab.assert_no_script_errors()
    play.assert_no_script_errors()
    play.close()
    tab.close()


def test_admin_console_shows_names_and_errors_as_text(browser, tiny_server, gateway):
    """Channel names, models, token names and logged errors are data: none of them becomes markup."""
    hostile = '<img src=x onerror="window.__pwned=1">'
    admin = gateway.admin()
    admin.add_channel(f"gpu {hostile}", tiny_server.base_url, models=[f"m{hostile}"],
                      model_mapping={f"<b>{hostile}": "random-tiny"})
    key = admin.add_token(f"<b>bob</b>{hostile}").key
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError):  # logged with the model name in its error message
        client.chat.completions.create(model=f"nope{hostile}", messages=[{"role": "user", "content": "hi"}])

    tab = Page(browser)
    page = tab.page
    sign_in(page, gateway.url)
    page.wait_for_selector("#app:not([hidden])")
    for view in ("overview", "channels", "tokens", "logs"):
        open_view(page, view)
        page.wait_for_timeout(300)
    open_view(page, "channels")
    assert page.locator("#channels-table .name").first.text_content() == f"gpu {hostile}"
    open_view(page, "logs")
    error_cell = page.locator("#logs-table tbody tr").first.locator("td[data-label=Error]")
    assert hostile in error_cell.text_content()
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert page.evaluate("[...document.querySelectorAll('b')].filter((b) => b.textContent.includes('bob')).length") == 0
    assert page.evaluate("window.__pwned") is None
    tab.assert_no_script_errors()
    tab.close()


def test_token_form_sets_tokens_per_minute_and_limits_per_model(browser, gateway):
    admin = gateway.admin()
    tab = Page(browser)
    page = tab.page
    sign_in(page, gateway.url)
    page.wait_for_selector("#app:not([hidden])")
    open_view(page, "tokens")
    page.click("#add-token")
    form = page.locator("#token-form")
    form.locator("[name=name]").fill("carol")
    form.locator("[name=tpm_limit]").fill("20000")
    form.locator("[name=model_limits]").fill("big=rpm:10\nsmall=tpm")
    form.locator("button[type=submit]").click()
    form.locator(".form-error", has_text="limits line 'small=tpm' is not model=rpm:N,tpm:M").wait_for()
    form.locator("[name=model_limits]").fill("big=rpm:10\norg/m:8b=rpm:2,tpm:5000")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("#key-dialog[open]")
    page.click("#key-done")
    token = admin.tokens()[0]
    assert token.tpm_limit == 20000
    assert {m: (l.rpm, l.tpm) for m, l in token.model_limits.items()} == {"big": (10, None), "org/m:8b": (2, 5000)}
    carol = row(page, "tokens-table", "carol")
    limits = carol.locator(".limits")
    limits.wait_for()
    assert "≤ 20,000 tokens/min" in limits.text_content()
    assert "org/m:8b: ≤ 2 requests/min, 5,000 tokens/min" in limits.text_content()
    # editing shows what is stored; emptying the field clears the per-model limits
    carol.locator("button", has_text="Edit").click()
    assert form.locator("[name=model_limits]").input_value() == "big=rpm:10\norg/m:8b=rpm:2,tpm:5000"
    form.locator("[name=model_limits]").fill("")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("#token-dialog:not([open])", state="attached")
    assert admin.tokens()[0].model_limits is None
    tab.assert_no_script_errors()
    tab.close()
