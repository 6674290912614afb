"""notebooks/03_stop_behaviour.ipynb in JupyterLab 4, in a real Chromium: the StopPanel widget's buttons work.

nbclient runs the notebooks without a front end (tests/lab/test_notebooks.py); this test checks what a
person sees: the ipywidgets render in JupyterLab, Start streams tokens into the panel, Stop ends the
stream and the server goes idle, and the rest of the notebook runs after it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time

import httpx
import pytest

from helpers.browser import ROOT, Page, chromium, requires_browser, screenshot

pytestmark = [requires_browser, pytest.mark.slow, pytest.mark.timeout(300)]

NOTEBOOK = "notebooks/03_stop_behaviour.ipynb"


@pytest.fixture
def jupyter_lab(tmp_path):
    """``jupyter lab`` on a free 127.0.0.1 port, with a known token and a kernel on this interpreter."""
    from llama_lab.web.launcher import free_port

    kernels = tmp_path / "jupyter-path" / "kernels" / "python3"  # shadows any user-level 'python3' kernel
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (llama_lab tests)", "language": "python",
    }))
    # No autosave: the notebook must stay committed without outputs (tests/lab/test_notebooks.py checks it).
    # No news feed: this machine reaches no website, and the question would cover the page.
    settings = tmp_path / "lab-settings" / "@jupyterlab"
    for plugin, values in {"docmanager-extension/plugin": {"autosave": False},
                           "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}.items():
        (settings / plugin).parent.mkdir(parents=True, exist_ok=True)
        (settings / plugin).with_suffix(".jupyterlab-settings").write_text(json.dumps(values))
    committed = (ROOT / NOTEBOOK).read_bytes()
    token = secrets.token_hex(16)
    port = free_port()
    env = {
        **os.environ,
        "JUPYTER_PATH": str(tmp_path / "jupyter-path"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "LLAMA_LAB_QUICK": "1",   # the notebook's short settings
        "OMP_NUM_THREADS": "1",   # as in tests/lab/test_notebooks.py: small shared CI machines
    }
    log = (tmp_path / "jupyter.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}",
         "--allow-root", "--LabApp.news_url=", "--LabApp.extension_manager=readonly",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"jupyter lab exited: {(tmp_path / 'jupyter.log').read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/api/status", params={"token": token}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "jupyter lab did not answer within 90 s"
            time.sleep(0.3)
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if (ROOT / NOTEBOOK).read_bytes() != committed:  # saved anyway (a person pressed Ctrl+S?): put it back
            (ROOT / NOTEBOOK).write_bytes(committed)
            pytest.fail(f"JupyterLab saved {NOTEBOOK} during the test; restored the committed version")


def code_cell(page, contains: str):
    return page.locator(".jp-CodeCell").filter(has=page.locator(".jp-InputArea", has_text=contains))


def run_from_menu(page, item: str) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$")).click()


def wait_cells_done(page, timeout_s: float) -> None:
    """Every code cell has run: no '[*]' and no '[ ]' prompt left."""
    page.wait_for_function("""() => {
        const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map((p) => p.textContent.trim());
        return prompts.length > 0 && prompts.every((p) => /^\\[\\d+\\]:$/.test(p));
    }""", timeout=timeout_s * 1000, polling=500)


def panel_number(status) -> int | None:
    match = re.search(r"generated (\d+) token\(s\) after Stop", status.text_content())
    return int(match.group(1)) if match else None


def test_stop_panel_in_jupyterlab(jupyter_lab):
    url, token = jupyter_lab
    started = time.monotonic()
    with chromium() as browser:
        tab = Page(browser, {"width": 1280, "height": 900})
        page = tab.page
        page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={token}")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)

        # Run everything up to the panel: select the cell after it, then Run > Run All Above Selected Cell.
        panel_cell = code_cell(page, "panel = StopPanel")
        panel_cell.locator("xpath=following-sibling::*[1]").click()
        run_from_menu(page, "Run All Above Selected Cell")
        start = panel_cell.locator(".jupyter-widgets button", has_text="Start")
        start.wait_for(timeout=120_000)  # a widget, rendered by JupyterLab's widget manager
        # the StopPanel's VBox (the cell also shows the model loader's progress bar widget)
        panel = panel_cell.locator(".widget-vbox").filter(has=page.locator("button", has_text="Start"))
        stop = panel.locator(".jupyter-widgets button", has_text="Stop")
        status = panel.locator(".widget-hbox .widget-html")
        text = panel.locator(".widget-output").first
        assert stop.is_disabled() and status.text_content().strip() == "idle"

        start.click()
        page.wait_for_function("(el) => el.textContent.trim().length >= 12", arg=text.element_handle(), timeout=60_000)
        stop.click()
        page.wait_for_function("(el) => /after Stop/.test(el.textContent)", arg=status.element_handle(), timeout=30_000)
        streamed = text.text_content().strip()
        assert streamed, "the panel showed no tokens"
        chunks = int(re.search(r"after (\d+) chunks", status.text_content()).group(1))
        assert chunks >= 1
        # The panel re-reads the server's counter every second. Its baseline is read just before the
        # connection closes, so the step in flight may still show up once; then the number must hold.
        readings = [panel_number(status)]
        for _ in range(5):
            time.sleep(2)
            readings.append(panel_number(status))
            if readings[-1] == readings[-2]:
                break
        assert readings[-1] == readings[-2], f"the server kept generating after Stop: {readings}"
        after_stop = readings[-1]
        assert after_stop is not None and after_stop <= 3, (readings, status.text_content())
        assert start.is_enabled() and stop.is_disabled()
        panel_cell.scroll_into_view_if_needed()
        screenshot(page, "jupyterlab-stop-panel", full_page=False)

        # The rest of the notebook: the scripted experiment, both servers, the table and plots.
        panel_cell.locator("xpath=following-sibling::*[1]").click()
        run_from_menu(page, "Run Selected Cell and All Below")
        wait_cells_done(page, timeout_s=240)
        outputs = page.locator(".jp-Notebook").text_content()
        assert "PANEL:" in outputs and "tokens after leave" in outputs
        assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").filter(
            has_text="Traceback").count() == 0
        assert page.locator("[data-mime-type='application/vnd.jupyter.error']").count() == 0
        screenshot(page, "jupyterlab-notebook-end", full_page=False)
        tab.close()
    print(f"JupyterLab run: {time.monotonic() - started:.0f} s, {chunks} chunks streamed, {after_stop} token(s) after Stop")
