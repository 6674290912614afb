"""A foreign OpenAI-compatible server as a channel: ``transformers serve`` (from pip, as the README's peer).

It pins the model it was started with and refuses any other name, so the channel maps the name clients
use onto that path. Stream, non-stream, a client that leaves, and the accounting, through the gateway.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import httpx
import pytest

from helpers.gateway import ADMIN_KEY, QuotaProbe, sse_data, wait_for
from llama_lab.gateway import serve_gateway
from llama_lab.web.launcher import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _transformers_cli() -> str | None:
    exe = Path(sys.executable).with_name("transformers")
    return str(exe) if exe.exists() else shutil.which("transformers")


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory):
    cli = _transformers_cli()
    if cli is None:
        pytest.skip("the transformers CLI is not installed")
    from llama_lab import load_model

    model_dir = tmp_path_factory.mktemp("tiny-hf")
    lm = load_model("random:tiny")  # a random tiny Llama with the real tokenizer, saved as a Hugging Face dir
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    server = ServerProcess([cli, "serve", str(model_dir), "--host", "127.0.0.1", "--port", "{port}", "--device", "cpu"],
                           startup_timeout_s=180, name="transformers serve")
    server.start()
    yield server, str(model_dir)
    server.stop()


def test_transformers_serve_as_a_channel(hf_server, tmp_path):
    server, model_dir = hf_server
    db = f"sqlite:///{tmp_path / 'gw.db'}"
    gateway = serve_gateway(port=0, db=db, admin_key=ADMIN_KEY)
    probe = QuotaProbe(db)
    try:
        with gateway.admin() as admin:
            admin.add_channel("hf", server.url + "/v1", models=["tiny-hf"], model_mapping={"tiny-hf": model_dir})
            token = admin.add_token("alice", quota=100_000)
            assert admin.test_channel(admin.channels()[0].id).ok
            headers = {"authorization": f"Bearer {token.key}"}
            body = {"model": "tiny-hf", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

            plain = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=120)
            assert plain.status_code == 200 and plain.headers["x-llama-lab-channel"] == "hf", plain.text
            usage = plain.json()["usage"]
            assert usage["completion_tokens"] <= 4 and usage["prompt_tokens"] > 0

            # streamed, the client not asking for usage: the gateway asks for it upstream and strips that chunk
            streamed = httpx.post(gateway.url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                                  timeout=120)
            events = [json.loads(d) for d in sse_data(streamed.text) if d != "[DONE]"]
            assert streamed.status_code == 200 and events and all(e["choices"] for e in events)
            assert any(c.get("finish_reason") for e in events for c in e["choices"])

            # a client that leaves mid-stream: logged as 499, its reservation released
            long = {**body, "max_tokens": 400, "stream": True}  # it refuses fields it does not know (ignore_eos)
            with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=long, headers=headers,
                              timeout=120) as resp:
                lines = resp.iter_lines()
                for _ in range(4):
                    next(lines)
            gone = wait_for(lambda: (rows := admin.logs(token_id=token.id, limit=1)) and rows[0].status == 499 and rows[0])
            assert gone.channel_name == "hf"

            logs = wait_for(lambda: len(rows := admin.logs(token_id=token.id, limit=10)) == 3 and rows)
            assert wait_for(lambda: probe.state(token.id)[1] == 0)  # nothing held any more
            used, _, _ = probe.state(token.id)
            assert used == sum(r.total_tokens for r in logs) and logs[-1].total_tokens == usage["total_tokens"]
            assert logs[1].total_tokens > 0  # the streamed answer was charged from the usage the gateway asked for
    finally:
        probe.close()
        gateway.stop()
