"""``python -m llama_lab serve``: the new flags, the old demo's flags, and clear one-line errors."""

from __future__ import annotations

import httpx
import pytest
from helpers.cli import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A Hugging Face directory (config, safetensors, tokenizer) of the random tiny preset, written here.

    The old demo's ``--base_model`` takes a directory; this test makes its own rather than reading
    one that some other test may or may not have left in the cache.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from llama_lab.model.loading import random_preset

    config, tokenizer = random_preset("tiny")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    target = tmp_path_factory.mktemp("tiny-checkpoint")
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def test_serve_random_tiny_answers_models_and_chat(cli_server):
    proc, url = cli_server("--model", "random:tiny", "--model-name", "llama-3-chinese")
    assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["llama-3-chinese"]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_old_demo_flags_work(cli_server, tiny_checkpoint):
    proc, url = cli_server("--base_model", str(tiny_checkpoint), "--only_cpu")
    health = httpx.get(url + "/health").json()
    assert health["mode"] == "cpu" and health["device"] == "cpu"
    assert httpx.get(url + "/v1/models").status_code == 200


@pytest.mark.parametrize("args,flag", [
    (["--mode", "3bit"], "--mode"),
    (["--port", "abc"], "--port"),
    (["--bogus"], "--bogus"),
    (["--model", "random:tiny", "--load_in_8bit", "--only_cpu"], "--only_cpu"),
    (["--base_model", "/nonexistent"], "/nonexistent"),
])
def test_bad_flags_and_unloadable_models_exit_with_one_clear_line(args, flag):
    done = run_cli("serve", *args)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("llama-lab: error:") and flag in lines[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_help_lists_the_flags():
    done = run_cli("serve", "--help")
    assert done.returncode == 0
    for flag in ("--model", "--base_model", "--port", "--host", "--api-key", "--model-name", "--cors-origins",
                 "--max-concurrency", "--prefill-chunk", "--max-body-bytes", "--tokens-per-usd",
                 "--load_in_8bit", "--load_in_4bit", "--only_cpu", "--gpus"):
        assert flag in done.stdout, flag
