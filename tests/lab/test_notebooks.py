"""Every notebook runs top to bottom headless (QUICK settings), and notebooks are committed without outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# What a successful run must have printed, per notebook (others: just no error).
KEY_OUTPUTS = {
    "01_quickstart.ipynb": ["ANSWER:", "STREAMED:", "CURL:"],
    "02_quantization_table.ipynb": ["MEASURED:", "| FAILED: none"],
    "03_stop_behaviour.ipynb": ["tokens after leave", "PANEL:"],
}


def test_there_are_notebooks():
    assert {"01_quickstart.ipynb", "03_stop_behaviour.ipynb"} <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; strip them before committing"


@pytest.fixture(scope="session")
def kernel_name(tmp_path_factory) -> str:
    """A kernelspec for *this* interpreter, so a user-level 'python3' kernel cannot shadow the venv."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "llama-lab-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "llama_lab tests", "language": "python"}))
    return str(root)


def _text(outputs) -> str:
    parts = []
    for out in outputs:
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_headless(path, kernel_name, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("LLAMA_LAB_QUICK", "1")
    monkeypatch.setenv("JUPYTER_PATH", kernel_name)
    # CI runners are small and often shared; two OpenMP threads per process can be 8x slower there.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="llama-lab-test",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    text = "\n".join(_text(c.outputs) for c in nb.cells if c.cell_type == "code")
    for key in KEY_OUTPUTS.get(path.name, []):
        assert key in text, f"{path.name} printed no {key!r}"
    if path.name == "01_quickstart.ipynb":
        answer = text.split("ANSWER:", 1)[1].splitlines()[0].strip()
        assert answer, "the quickstart's chat answer is empty"
    if path.name == "02_quantization_table.ipynb":
        import torch

        from llama_lab.lab.quant_table import default_modes

        measured = text.split("MEASURED:", 1)[1].split("|", 1)[0].split(", ")
        assert [m.strip() for m in measured] == list(default_modes("default"))
        if not torch.cuda.is_available():  # the CPU kernels' modes are rows of their own there
            assert {"gguf", "int8", "int4"} <= {m.strip() for m in measured}
