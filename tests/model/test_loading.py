"""Loading: every source and mode that runs on this CPU, and one clear error for each bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from llama_lab.model.loading import LoadError, converted_gguf_dir, embedded_gguf_path, load_model


def _answer(lm) -> str:
    from llama_lab.engine import Engine, SamplingParams

    with Engine(lm) as engine:
        return engine.generate(lm.chat_prompt_ids([{"role": "user", "content": "What is the capital of France?"}]),
                               SamplingParams(max_tokens=40, temperature=0)).text


def test_random_preset_is_labelled(tiny_model):
    assert tiny_model.random_weights
    assert "RANDOM weights" in repr(tiny_model)
    assert tiny_model.mode.value == "full" and tiny_model.context_length == 2048


def test_random_presets_are_reproducible():
    a, b = load_model("random:tiny", seed=3), load_model("random:tiny", seed=3)
    wa, wb = a.model.model.layers[0].mlp.up_proj.weight, b.model.model.layers[0].mlp.up_proj.weight
    assert (wa == wb).all()


@pytest.mark.slow
def test_default_model_full_answers_and_loads_fast(default_model):
    assert default_model.name == "smollm2-135m-instruct" and not default_model.random_weights
    assert "Paris" in _answer(default_model)
    started = time.perf_counter()
    again = load_model("default")
    assert time.perf_counter() - started < 3.0  # cached safetensors copy (<1 s on an idle machine)
    assert again.stop_token_ids == default_model.stop_token_ids


@pytest.fixture(scope="module")
def full_default():
    """The embedded GGUF widened to floats (``--mode full``): what bitsandbytes quantizes from."""
    return load_model("default", "full")


@pytest.mark.slow
@pytest.mark.parametrize("mode, bits, loaded_as", [("8bit", 8, "8bit"), ("4bit", 4, "4bit"), ("cpu", None, "gguf"),
                                                   ("full", None, "full")])
def test_default_model_every_cpu_mode(mode, bits, loaded_as, full_default):
    """Every mode answers; bitsandbytes shrinks the floats, and ``cpu`` keeps a GGUF's own quantization."""
    lm = load_model("default", mode)
    assert lm.mode.value == loaded_as and lm.device.type == "cpu"
    if bits:
        assert lm.weights_bytes < full_default.weights_bytes
        assert getattr(lm.model, f"is_loaded_in_{bits}bit")
    if loaded_as == "gguf":
        # under a byte a weight (4.5-bit blocks, an 8.5-bit embedding), whether full is fp32 or bf16 on this CPU
        params = full_default.weights_bytes / full_default.dtype.itemsize
        assert lm.weights_bytes < params, (lm.weights_bytes, params)
    assert "Paris" in _answer(lm)


@pytest.mark.slow
def test_gguf_path_and_directory_sources(default_model):
    gguf = embedded_gguf_path()
    by_file = load_model(str(gguf))
    assert by_file.name == gguf.stem and by_file.mode.value == "gguf"
    assert by_file.weights_bytes == default_model.weights_bytes
    by_dir = load_model(str(converted_gguf_dir(gguf)))  # a Hugging Face directory: floats
    assert by_dir.mode.value == "full"
    assert by_dir.weights_bytes == load_model("default", "full").weights_bytes


def test_missing_path(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LoadError, match="no weights"):
        load_model(str(tmp_path))


def test_unknown_mode_and_preset():
    with pytest.raises(LoadError, match="unknown load mode '3bit'"):
        load_model("random:tiny", "3bit")
    with pytest.raises(LoadError, match="unknown architecture preset 'huge'"):
        load_model("random:huge")


def test_cuda_requested_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(LoadError, match="CUDA is not available"):
        load_model("random:tiny", device="0")


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu-machine", "gpu-machine"])
def test_cpu_kernel_modes_stay_on_the_cpu(monkeypatch, tmp_path, cuda):
    """int8/int4/gguf run on CPU kernels: chosen on a GPU machine they load on the CPU, and a GPU device is refused."""
    import torch

    from llama_lab.model.loading import _resolve_device, _resolve_mode
    from llama_lab.model.presets import LoadMode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    gguf = tmp_path / "m.gguf"
    for mode in (LoadMode.Q8, LoadMode.Q4, LoadMode.GGUF):
        source = gguf if mode is LoadMode.GGUF else None
        assert _resolve_mode(mode, source, None) is mode
        assert _resolve_mode(mode, source, "cpu") is mode
        assert _resolve_device(mode, None).type == "cpu"
        with pytest.raises(LoadError, match=f"load mode '{mode.value}' runs on the CPU kernels"):
            _resolve_mode(mode, source, "0")
    # auto keeps a GGUF's quantization only where it will run on the CPU
    assert _resolve_mode(LoadMode.AUTO, gguf, None) is (LoadMode.FULL if cuda else LoadMode.GGUF)
    assert _resolve_mode(LoadMode.AUTO, gguf, "cpu") is LoadMode.GGUF
    assert _resolve_device(LoadMode.FULL, None).type == ("cuda" if cuda else "cpu")
    with pytest.raises(LoadError, match="unknown device 'tpu:x'"):
        _resolve_mode(LoadMode.AUTO, gguf, "tpu:x")


def test_4bit_without_bitsandbytes_is_one_clear_error():
    code = textwrap.dedent("""
        import sys
        sys.modules["bitsandbytes"] = None  # as on a platform where bitsandbytes cannot import
        from llama_lab.model.loading import LoadError, load_model
        try:
            load_model("random:tiny", "4bit")
        except LoadError as exc:
            print("LOADERROR:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOADERROR: load mode '4bit' needs bitsandbytes" in out.stdout, out.stderr[-2000:]


def test_random_tiny_quantized_modes():
    lm = load_model("random:tiny", "4bit")
    assert lm.model.is_loaded_in_4bit and lm.random_weights


@pytest.mark.slow
def test_conversion_cache_survives_a_crash_mid_write(tmp_path):
    """Kill the one-time GGUF conversion part-way: the next load must convert again, not load garbage."""
    env = {**os.environ, "LLAMA_LAB_CACHE": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", "from llama_lab import load_model; load_model('default')"], env=env)
    models = tmp_path / "models"
    deadline = time.time() + 120
    while time.time() < deadline and not (models.exists() and any(models.iterdir())):
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = [p for p in models.iterdir() if not p.name.startswith(".")]
    assert all((p / "llama_lab.json").is_file() for p in finished), "a visible cache entry must be complete"
    out = subprocess.run([sys.executable, "-c", "from llama_lab import load_model; print(load_model('default').name)"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "smollm2-135m-instruct" in out.stdout, out.stderr[-2000:]
    assert any((p / "llama_lab.json").is_file() for p in models.iterdir() if not p.name.startswith("."))


def test_import_is_fast():
    code = "import time; t = time.perf_counter(); import llama_lab; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert float(out.stdout.strip()) < 2.0
    heavy = subprocess.run([sys.executable, "-c", "import sys, llama_lab; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=60)
    assert heavy.stdout.strip() == "False"
