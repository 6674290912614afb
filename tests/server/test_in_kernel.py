"""The in-kernel server (``llama_lab.serve()`` in a notebook) beside a cell that computes."""

from __future__ import annotations

import subprocess
import sys
import time

# A client in its own process (a browser tab, NextChat): three chats, one after another.
CLIENT = """
import sys, httpx
url = sys.argv[1]
for i in range(3):
    body = {"messages": [{"role": "user", "content": f"Say something, {i}."}], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    r.raise_for_status()
    assert r.json()["usage"]["completion_tokens"] == 12, r.text
print("answered")
"""


def test_the_server_keeps_answering_while_a_cell_runs_a_pure_python_loop(tiny_server):
    """A pure-Python loop holds the GIL but for the interpreter's switch interval; the server's event
    loop and engine thread still get their turns, so a client is answered while the loop runs."""
    client = subprocess.Popen([sys.executable, "-c", CLIENT, tiny_server.url], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 150
    spins = 0
    try:
        while client.poll() is None and time.monotonic() < deadline:  # the "cell": never sleeps, never does I/O
            for _ in range(200_000):
                spins += 1
        out, _ = client.communicate(timeout=5)
    finally:
        client.kill()
    assert client.returncode == 0 and "answered" in out, out
    assert spins > 0
