"""Start and watch the servers that ``server_bench.py`` compares: ours and ``transformers serve``.

Each server is a real subprocess on a free 127.0.0.1 port; its CPU-seconds and RSS are read
with psutil (the process and its children), so a server that forks workers is counted whole.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import tarfile
import tempfile
import os
import shlex
import sys
import time
from pathlib import Path

import httpx
import psutil

from llama_lab.web.launcher import OFFLINE_ENV, ServerProcess, free_port  # noqa: F401 (OFFLINE_ENV: re-export)

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BENCH_DTYPE = "bfloat16"


def model_dir(explicit: str | None = None) -> Path:
    """HF-layout directory of the embedded SmolLM2: the safetensors copy ``llama_lab`` keeps in its cache."""
    if explicit:
        return Path(explicit)
    from llama_lab.model import converted_gguf_dir, embedded_gguf_path

    return converted_gguf_dir(embedded_gguf_path())


@dataclasses.dataclass
class ServerSpec:
    """How to launch one server under test; ``{port}`` and ``{model_dir}`` are filled in."""

    name: str
    label: str
    argv: list[str]
    startup_timeout_s: float = 900.0  # ours compiles its decode step at start-up (minutes on a cold cache)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    cwd: Path = REPO

    def command(self, port: int, mdir: Path) -> list[str]:
        return [a.format(port=port, model_dir=mdir, python=sys.executable) for a in self.argv]


def _transformers_cli() -> str:
    exe = Path(sys.executable).with_name("transformers")
    return str(exe) if exe.exists() else "transformers"


def baseline_tree(ref: str) -> Path:
    """This repository at ``ref`` (``git archive``, unpacked once into the temp dir): the previous engine."""
    target = Path(tempfile.gettempdir()) / "llama_lab_bench" / f"baseline-{ref}"
    if (target / "llama_lab").is_dir():
        return target
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref], check=True,
                             capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(target, filter="data")
    return target


def server_specs(ours_cmd: str | None = None, baseline_ref: str | None = None) -> dict[str, ServerSpec]:
    ours = shlex.split(ours_cmd) if ours_cmd else [
        "{python}", "-m", "llama_lab", "serve", "--model", "default", "--host", "127.0.0.1", "--port", "{port}",
        "--dtype", "bf16", "--compile",
    ]
    peer = [_transformers_cli(), "serve", "{model_dir}", "--host", "127.0.0.1", "--port", "{port}",
            "--device", "cpu", "--dtype", BENCH_DTYPE]
    specs = {
        "ours": ServerSpec("ours", "llama-lab serve", ours),
        "peer": ServerSpec("peer", "transformers serve", peer),
        "peer-cb": ServerSpec("peer-cb", "transformers serve --continuous-batching", [*peer, "--continuous-batching"]),
    }
    if baseline_ref:
        tree = baseline_tree(baseline_ref)
        old = ["{python}", "-m", "llama_lab", "serve", "--model", "default", "--host", "127.0.0.1", "--port", "{port}",
               "--dtype", "bf16"]
        specs["previous"] = ServerSpec("previous", f"llama-lab serve @{baseline_ref}", old,
                                       env={"PYTHONPATH": str(tree)}, cwd=tree)
    return specs


class RunningServer(ServerProcess):
    """One ``ServerSpec`` as a subprocess (llama_lab's one launcher), plus the model id it serves."""

    def __init__(self, spec: ServerSpec, mdir: Path):
        self.spec = spec
        port = free_port()
        self.cmd = spec.command(port, mdir)
        super().__init__(self.cmd, port=port, startup_timeout_s=spec.startup_timeout_s, cwd=spec.cwd, env=spec.env,
                         name=spec.name)
        self.base_url = self.url
        self.model_id = "default"

    def __enter__(self) -> "RunningServer":
        self.start()
        try:
            data = httpx.get(f"{self.base_url}/v1/models", timeout=10).json().get("data") or []
            if data:
                self.model_id = data[0]["id"]
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        return self

    def log_tail(self, n: int = 40) -> str:
        return self.log(n)


class ForeignLoad:
    """CPU used by processes other than the server under test and this bench, over a span.

    The machine is shared (2 cores); a test suite running beside a timed scenario makes torch's
    spinning OpenMP threads collapse, so every timed figure carries the foreign load seen with it.
    """

    def __init__(self, srv: "RunningServer | None" = None):
        self.srv = srv
        self.me = psutil.Process()

    def _busy(self) -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def _mine(self) -> float:
        c = self.me.cpu_times()
        return c.user + c.system + c.children_user + c.children_system

    def _srv_cpu(self) -> float:
        return self.srv.cpu_seconds() if self.srv is not None else 0.0

    def start(self) -> "ForeignLoad":
        self.t0, self.b0, self.s0, self.m0 = time.perf_counter(), self._busy(), self._srv_cpu(), self._mine()
        return self

    def cores(self) -> float:
        """Average cores used by other processes since ``start``."""
        wall = time.perf_counter() - self.t0
        foreign = (self._busy() - self.b0) - (self._srv_cpu() - self.s0) - (self._mine() - self.m0)
        return max(0.0, foreign / wall) if wall > 0 else 0.0


def describe_env() -> dict:
    import platform

    info = {"python": platform.python_version(), "cpus": os.cpu_count()}
    for pkg in ("torch", "transformers"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - informational only
            info[pkg] = None
    return info


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=False, default=str)
