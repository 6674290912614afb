"""The quantization table: theory vs framework bytes, a real (tiny) table, the CSV, the script."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from llama_lab.lab.quant_table import (
    MIB, PERPLEXITY_TEXT, SEED_8B_MIB, WEIGHTS_TOLERANCE, BenchSettings, ModeResult, default_modes, format_table,
    gguf_weight_types, load_csv, preset_inventory, run_table, save_csv, summary_json, weight_inventory,
)
from llama_lab.model.presets import ARCH_PRESETS

ROOT = Path(__file__).resolve().parents[2]
ALL_MODES = ("full", "8bit", "4bit", "cpu", "int8", "int4")
# what the table measures on a CPU-only machine for the embedded model (data/quant_table_cpu.csv)
CPU_TABLE_MODES = ("full", "8bit", "4bit", "gguf", "int8", "int4")


@pytest.fixture(scope="module")
def kernels():
    from llama_lab.model.quant import require_kernels

    try:
        require_kernels()
    except RuntimeError as exc:
        pytest.skip(f"no C++ toolchain here: {exc}")


def llama_bytes(config, linear_bits: float, table_bits: float, norm_bits: float) -> int:
    """A Llama's weight bytes counted by hand from its config: decoder linears, embedding (+ untied head), norms."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    linears = layers * (2 * h * h + 2 * h * kv + 3 * h * i)  # q, o; k, v; gate, up, down
    tables = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    norms = (2 * layers + 1) * h
    return round((linears * linear_bits + tables * table_bits + norms * norm_bits) / 8)


@pytest.mark.parametrize("mode", ["full", "8bit", "4bit"])
def test_weights_memory_within_15pct_of_theory(mode):
    from llama_lab import load_model

    lm = load_model("random:tiny", mode)
    inv = weight_inventory(lm.model, mode, lm.dtype)
    assert inv.params == sum(p.numel() for p in load_model("random:tiny", "full").model.parameters())
    assert abs(lm.weights_bytes / inv.theoretical_bytes - 1) <= WEIGHTS_TOLERANCE
    if mode != "full":
        bnb = {"8bit": "bnb-int8", "4bit": "bnb-nf4"}[mode]
        assert inv.quantized_params == inv.params_by_format[bnb] > 0
        # bitsandbytes leaves the embedding (tied head) in the compute dtype
        assert inv.params_by_format[str(lm.dtype).replace("torch.", "")] >= lm.model.config.vocab_size * 64


@pytest.mark.parametrize(("mode", "linear_bits"), [("int8", 8.5), ("int4", 5)])
def test_cpu_kernel_modes_store_what_the_layout_says(kernels, mode, linear_bits):
    """int8/int4: linears q8 (8.5 bits) or q4 (5 bits), the tied embedding q8 once, norms float32, nothing else."""
    from llama_lab import load_model

    lm = load_model("random:tiny", mode)
    config = lm.model.config
    expected = llama_bytes(config, linear_bits, 8.5, 32)
    inv = weight_inventory(lm.model, mode, lm.dtype)
    assert inv.theoretical_bytes == expected
    assert inv.params_by_format["q8"] >= config.vocab_size * config.hidden_size
    assert inv.params_by_format["float32"] == (2 * config.num_hidden_layers + 1) * config.hidden_size
    # the framework's count is the theory plus the rotary buffers (a few hundred bytes), not 15% either way
    assert 0 <= lm.weights_bytes - expected < 1024
    # the float model's inventory in the same mode is the same layout: the theory does not read the packing
    float_model = load_model("random:tiny", "full").model
    assert weight_inventory(float_model, mode, lm.dtype).params_by_format == inv.params_by_format


def test_gguf_mode_follows_the_files_types(kernels):
    """The embedded file: Q4_1 linears (q4, 5 bits), a Q8_0 embedding tied to the head (q8 once), F32 norms."""
    from llama_lab import load_model
    from llama_lab.model.loading import embedded_gguf_path

    types = gguf_weight_types(embedded_gguf_path())
    assert types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
    assert types["model.embed_tokens.weight"] == "Q8_0" and "lm_head.weight" not in types
    lm = load_model("default", "gguf")
    inv = weight_inventory(lm.model, "gguf", lm.dtype, types)
    config = lm.model.config
    assert inv.theoretical_bytes == llama_bytes(config, 5, 8.5, 32)
    assert inv.params_by_format["q8"] == config.vocab_size * config.hidden_size
    assert 134e6 < inv.params < 135e6 and set(inv.params_by_format) == {"q4", "q8", "float32"}
    assert 0 <= lm.weights_bytes - inv.theoretical_bytes < 1024
    # had the file said Q8_0 everywhere, the theory would say so: it reads the types, not the loaded modules
    all_q8 = weight_inventory(lm.model, "gguf", lm.dtype, {name: "Q8_0" for name in types})
    assert all_q8.params_by_format["q8"] == inv.params - inv.params_by_format["float32"]
    with pytest.raises(ValueError, match="gguf_types"):
        weight_inventory(lm.model, "gguf", lm.dtype)
    with pytest.raises(ValueError, match="auto"):
        weight_inventory(lm.model, "auto", lm.dtype)


def test_8b_theory_in_the_cpu_kernel_layouts():
    """The 8B in int4: q4 linears, an untied embedding and head in q8 each, float32 norms: 5.1 GiB."""
    from transformers import LlamaConfig

    config = LlamaConfig(**ARCH_PRESETS["llama-3-8b"])
    int4, int8 = preset_inventory("llama-3-8b", "int4"), preset_inventory("llama-3-8b", "int8")
    assert int4.theoretical_bytes == llama_bytes(config, 5, 8.5, 32) == 5_479_481_344
    assert int8.theoretical_bytes == llama_bytes(config, 8.5, 8.5, 32)
    assert int4.params == int8.params == preset_inventory("llama-3-8b", "full").params
    assert int4.params_by_format["q8"] == 2 * 128256 * 4096  # embedding and head, not tied


def test_default_modes_on_this_machine():
    import torch

    if torch.cuda.is_available():
        assert default_modes() == ("full", "8bit", "4bit", "cpu")
    else:  # "cpu" would load what "gguf" loads; a random preset has no GGUF file
        assert default_modes("default") == CPU_TABLE_MODES
        assert default_modes("random:tiny") == ("full", "8bit", "4bit", "int8", "int4")
    assert BenchSettings().modes == default_modes()
    quick = BenchSettings.quick()
    assert quick.modes == default_modes() and quick.compile_for("int4") is False and quick.compile_for("gguf") is False
    assert quick.compile_for("full") is None and BenchSettings().compile_for("int4") is None


def test_8b_theory_explains_the_seed_measurements():
    """The seed's nvidia-smi figures are the weights plus a CUDA context, mode by mode."""
    theory = {m: preset_inventory("llama-3-8b", m).theoretical_bytes / MIB for m in ("full", "8bit", "4bit")}
    full = preset_inventory("llama-3-8b", "full")
    assert 8.0e9 < full.params < 8.1e9
    assert theory["full"] > theory["8bit"] > theory["4bit"]
    for mode, mib in theory.items():
        overhead = SEED_8B_MIB[mode] - mib
        assert 0 < overhead < 1024, (mode, mib, SEED_8B_MIB[mode])


@pytest.fixture(scope="module")
def tiny_table():
    settings = BenchSettings.quick(source="random:tiny", modes=ALL_MODES, isolate=False, decode_tokens=8,
                                   answer_tokens=4, ppl_max_tokens=64)
    return run_table(settings, progress=False)


def test_tiny_table_has_every_mode_with_sane_values(tiny_table, tmp_path):
    assert [r.mode for r in tiny_table] == list(ALL_MODES)
    for r in tiny_table:
        assert not r.error, r.error
        assert r.random_weights and r.device == "cpu"
        assert r.load_s > 0 and r.weights_bytes > 0 and r.weights_within_tolerance
        assert r.process_rss_bytes > r.weights_bytes
        # growth over the pre-load RSS while generating: for a 6 MB model that is allocator noise
        # (the idle engine's malloc_trim can even hand back heap held before the load), so only
        # check it is a real, bounded reading; the embedded-model test checks real growth
        assert math.isfinite(r.peak_mem_bytes) and abs(r.peak_mem_bytes) < 256 * 2**20
        assert 0 < r.ttft_s < 10
        assert r.decode_tok_s_b1 > 0 and r.decode_tok_s_batch > 0
        assert r.batch == 8 and "engine" in r.batch_method
        assert math.isfinite(r.perplexity) and r.perplexity > 1
        assert r.ppl_tokens == 64
        if r.energy_source == "unavailable":
            assert math.isnan(r.energy_j_per_token)
    full = {r.mode: r for r in tiny_table}
    assert full["4bit"].weights_bytes < full["8bit"].weights_bytes < full["full"].weights_bytes
    assert full["int4"].weights_bytes < full["int8"].weights_bytes < full["full"].weights_bytes
    assert full["int4"].weights_layout.startswith("q8 ")  # tiny: the 49k-row embedding outweighs the linears
    assert "q4" in full["int4"].weights_layout and "q4" not in full["int8"].weights_layout
    # quick settings decode the CPU kernels' modes eagerly (no compile per mode), and the table says so
    assert full["int4"].engine_decode == "eager" and full["int8"].engine_decode == "eager"

    path = save_csv(tiny_table, tmp_path / "t.csv")
    df = load_csv(path)
    assert list(df["mode"]) == list(ALL_MODES)
    for col in ("cpu", "gpu", "torch", "transformers", "bitsandbytes", "weights_vs_theory", "ttft_s"):
        assert col in df.columns
    assert df["torch"].iloc[0] != "not installed"

    text = format_table(tiny_table)
    for mode in ALL_MODES:
        assert f"\n{mode.rjust(4)}" in text
    summary = summary_json(tiny_table)
    assert set(summary) == set(ALL_MODES) and summary["full"]["weights_within_15pct"] is True


def test_a_failing_mode_becomes_a_row_not_a_crash():
    rows = run_table(BenchSettings(source="random:no-such-preset", modes=("full",), isolate=False), progress=False)
    assert rows[0].error and "no-such-preset" in rows[0].error
    assert "error" in format_table(rows)


def test_perplexity_text_is_a_few_hundred_tokens():
    words = PERPLEXITY_TEXT.read_text(encoding="utf-8").split()
    assert 250 <= len(words) <= 600


def test_shipped_cpu_table():
    """data/quant_table_cpu.csv was produced by bench/quant_table.py on the embedded model."""
    df = load_csv(Path(__file__).resolve().parents[2] / "data" / "quant_table_cpu.csv")
    assert list(df["mode"]) == list(CPU_TABLE_MODES)
    assert (df["error"] == "").all()
    assert df["weights_within_tolerance"].all()
    assert ((df["weights_vs_theory"] - 1).abs() <= WEIGHTS_TOLERANCE).all()
    assert (df["params"].between(134e6, 135e6)).all()
    by = df.set_index("mode")
    assert by.loc["4bit", "weights_bytes"] < by.loc["8bit", "weights_bytes"] < by.loc["full", "weights_bytes"]
    assert by.loc["int4", "weights_bytes"] < by.loc["int8", "weights_bytes"] < by.loc["full", "weights_bytes"]
    assert by.loc["gguf", "weights_bytes"] == by.loc["int4", "weights_bytes"]  # Q4_1 + Q8_0 is int4's layout
    for mode in ("gguf", "int8", "int4"):  # the kernels' layouts are exact: only the rotary buffers are extra
        assert 0 <= by.loc[mode, "weights_bytes"] - by.loc[mode, "theoretical_bytes"] < 1024
        assert by.loc[mode, "perplexity"] < 1.2 * by.loc["full", "perplexity"]
        assert by.loc[mode, "decode_tok_s_batch"] > 0 and by.loc[mode, "device_mem_bytes"] > 0
    assert (df["decode_tok_s_b1"] > 0).all() and (df["ttft_s"] > 0).all()
    assert by.loc["full", "perplexity"] < 50
    assert "Paris" in by.loc["full", "greedy_answer"] and "Paris" in by.loc["gguf", "greedy_answer"]
    for col in ("cpu", "torch", "transformers", "bitsandbytes"):
        assert isinstance(df[col].iloc[0], str) and df[col].iloc[0]


def test_script_prints_table_and_json_last(tmp_path):
    out = tmp_path / "table.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.quant_table", "--source", "random:tiny", "--quick",
         "--modes", "full,4bit", "--decode-tokens", "4", "--no-isolate", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert set(summary["results"]) == {"full", "4bit"} and summary["failed"] == []
    assert "tok/s b1" in proc.stdout and "seed nvidia-smi MiB" in proc.stdout and " int4 " in proc.stdout
    assert load_csv(out)["mode"].tolist() == ["full", "4bit"]


@pytest.mark.slow
def test_embedded_model_each_mode_in_its_own_process():
    rows = run_table(BenchSettings.quick(modes=("full", "4bit")), progress=False)
    by = {r.mode: r for r in rows}
    for r in rows:
        assert not r.error, r.error
        assert r.weights_within_tolerance
        assert r.model == "smollm2-135m-instruct" and not r.random_weights
        # a fresh process per mode: the RSS growth is this mode's load, not the sum of every mode
        assert r.device_mem_bytes < 1.0 * 2**30
    assert by["4bit"].weights_bytes < 0.5 * by["full"].weights_bytes
    # the peak while generating is measured from before the load, so it holds the weights
    assert by["full"].peak_mem_bytes > 0.5 * by["full"].weights_bytes
    assert "Paris" in by["full"].greedy_answer
    assert by["full"].perplexity < by["4bit"].perplexity * 1.05  # 4-bit does not beat full precision
    assert isinstance(by["full"], ModeResult)
