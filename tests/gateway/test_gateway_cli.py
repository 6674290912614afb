"""``llama-lab gateway``: flags generated from the schema models, and a quiet stderr by default."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from helpers.gateway import ROOT, GatewayProcess
from llama_lab.gateway.cli import build_parser, model_values
from llama_lab.gateway.schemas import CHANNELS, TOKENS, LogFilter


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_channel_flags_come_from_the_channel_model():
    args = parse("channel", "add", "gpu", "http://10.0.0.2:19327/v1", "--models", "a, b", "--map", "x=a", "--map", "y=b",
                 "--priority", "5", "--disable")
    assert model_values(args, CHANNELS.create) == {
        "name": "gpu", "base_url": "http://10.0.0.2:19327/v1", "models": ["a", "b"],
        "model_mapping": {"x": "a", "y": "b"}, "priority": 5, "enabled": False,
    }
    CHANNELS.create(**model_values(args, CHANNELS.create))  # what the CLI sends validates
    # An update carries only what was typed.
    assert model_values(parse("channel", "update", "3", "--enable", "--weight", "0"), CHANNELS.patch) == {
        "enabled": True, "weight": 0}
    assert set(CHANNELS.patch.model_fields) == set(CHANNELS.create.model_fields)


def test_token_flags_come_from_the_token_model():
    args = parse("token", "add", "alice", "--quota", "100", "--expires", "30d", "--subnet", "10.0.0.0/8",
                 "--subnet", "127.0.0.1")
    values = model_values(args, TOKENS.create)
    assert values["quota"] == 100 and values["subnets"] == ["10.0.0.0/8", "127.0.0.1"]
    assert abs(values["expires_at"] - (time.time() + 30 * 86400)) < 60
    update = model_values(parse("token", "update", "1", "--unlimited", "--expires", "never", "--used", "0"), TOKENS.patch)
    assert update == {"quota": None, "expires_at": None, "used": 0}  # null clears quota and expiry
    assert "used" in TOKENS.patch.model_fields and "used" not in TOKENS.create.model_fields


def test_rate_limit_flags_come_from_the_token_model():
    args = parse("token", "add", "bob", "--rpm", "60", "--tpm", "40000", "--model-limit", "big=rpm:5,tpm:1000",
                 "--model-limit", "org/m:8b=tpm:300")
    values = model_values(args, TOKENS.create)
    assert values["tpm_limit"] == 40000
    assert values["model_limits"] == {"big": {"rpm": 5, "tpm": 1000}, "org/m:8b": {"tpm": 300}}
    assert TOKENS.create(**values).model_limits["org/m:8b"].rpm is None  # what the CLI sends validates
    update = model_values(parse("token", "update", "1", "--no-tpm", "--no-model-limits"), TOKENS.patch)
    assert update == {"tpm_limit": None, "model_limits": None}  # null clears them


def test_log_flags_come_from_log_filter():
    values = model_values(parse("logs", "--token", "2", "--status", "429", "--since", "1h"), LogFilter)
    assert values["token_id"] == 2 and values["status"] == 429 and values["limit"] == 20
    assert abs(values["since"] - (time.time() - 3600)) < 60  # an hour *ago*
    LogFilter(**values)


@pytest.mark.parametrize(("argv", "words"), [
    (["channel", "add", "x", "http://h", "--map", "nonsense"], "want REQUESTED=UPSTREAM"),
    (["token", "add", "x", "--expires", "someday"], "use never, 30d"),
    (["token", "add", "x", "--quota", "lots"], "invalid"),
    (["token", "add", "x", "--quota", "5", "--unlimited"], "not allowed with"),
    (["token", "add", "x", "--model-limit", "big=rpm:lots"], "argument --model-limit: want MODEL=rpm:N,tpm:M"),
    (["token", "add", "x", "--tpm", "many"], "argument --tpm"),
])
def test_bad_flags_exit_2_saying_why(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2 and words in capsys.readouterr().err


def _cli(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLAMA_LAB_ADMIN_KEY": "test-admin-key", "LLAMA_LAB_GATEWAY_URL": url}
    return subprocess.run([sys.executable, "-m", "llama_lab", "gateway", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_admin_commands_are_quiet_on_stderr(tmp_path):
    gateway = GatewayProcess(f"sqlite:///{tmp_path / 'gw.db'}").start()
    try:
        for args in (["token", "add", "alice", "--quota", "10"], ["token", "list"], ["channel", "list"], ["logs"],
                     ["token", "update", "1", "--used", "0", "--json"]):
            out = _cli(gateway.url, *args)
            assert out.returncode == 0 and out.stdout, out.stderr
            assert out.stderr == "", f"`llama-lab gateway {' '.join(args)}` wrote to stderr: {out.stderr}"
        loud = _cli(gateway.url, "token", "list", "--log-level", "debug")
        assert loud.returncode == 0 and "HTTP Request: GET" in loud.stderr  # the lines exist; they are just not shown
        bad = _cli(gateway.url, "token", "delete", "99")
        assert bad.returncode == 1 and bad.stderr == "error: No token with id 99.\n"
    finally:
        gateway.stop()
