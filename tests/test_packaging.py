"""The wheel works without the checkout: its lab data ships inside it, and the server-only install
has no notebook stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_core_install_has_no_notebook_stack():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(deps["dependencies"]).lower()
    for name in ("jupyterlab", "ipywidgets", "pandas", "matplotlib", "tqdm", "nest-asyncio"):
        assert name not in core, f"{name} is a core dependency; it belongs to the [lab] extra"
    lab = " ".join(deps["optional-dependencies"]["lab"]).lower()
    for name in ("jupyterlab", "ipywidgets", "pandas", "matplotlib"):
        assert name in lab


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """A fresh venv with the built wheel installed (not editable); dependencies come from this venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True, text=True)
    wheel = next(dist.glob("llama_lab-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # The wheel goes into the fresh venv; torch & co. are reused from this venv's site-packages via a
    # plain path line (a path added by a .pth is not a site dir, so the editable install's finder stays out).
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp / "elsewhere"  # no checkout here: nothing can be read from the repository by accident
    work.mkdir()
    return python, site, work


def _run(python: Path, work: Path, code: str, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", LLAMA_LAB_QUICK="1")
    done = subprocess.run([str(python), "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.strip().splitlines()[-1]


def test_wheel_runs_the_quick_quantization_table_outside_the_checkout(wheel_env):
    python, site, work = wheel_env
    code = """
import json, llama_lab
from llama_lab.lab.quant_table import BenchSettings, PERPLEXITY_TEXT, run_table
res = run_table(BenchSettings.quick(modes=("full",)), progress=False)
print(json.dumps({"pkg": llama_lab.__file__, "ppl_file": str(PERPLEXITY_TEXT), "error": res[0].error,
                  "ppl": res[0].perplexity, "tok_s": res[0].decode_tok_s_b1}))
"""
    out = json.loads(_run(python, work, code))
    assert out["pkg"].startswith(str(site)), out  # the installed wheel, not the checkout
    assert out["ppl_file"].startswith(str(site)) and not out["ppl_file"].startswith(str(ROOT))
    assert not out["error"] and out["ppl"] > 1 and out["tok_s"] > 0


def test_wheel_runs_the_stop_experiment_outside_the_checkout(wheel_env):
    python, site, work = wheel_env
    code = """
import json
from llama_lab.lab.stop_experiment import StopSettings, compare
res = compare(StopSettings.quick(max_tokens=60, leave_after=4, watch_s=20.0, threads=1))
print(json.dumps({r.server: {"after": r.tokens_after_leave, "ended": r.ended_before_leave} for r in res}))
"""
    out = json.loads(_run(python, work, code))
    assert set(out) == {"llama_lab", "old demo"}
    assert out["llama_lab"]["after"] <= 2, out
