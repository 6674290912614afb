"""The quantization table: theory vs framework bytes, a real (tiny) table, the CSV, the script."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from llama_lab.lab.quant_table import (
    MIB, PERPLEXITY_TEXT, SEED_8B_MIB, WEIGHTS_TOLERANCE, BenchSettings, ModeResult, format_table,
    load_csv, preset_inventory, run_table, save_csv, summary_json, weight_inventory,
)

ROOT = Path(__file__).resolve().parents[2]
ALL_MODES = ("full", "8bit", "4bit", "cpu")


@pytest.mark.parametrize("mode", ["full", "8bit", "4bit"])
def test_weights_memory_within_15pct_of_theory(mode):
    from llama_lab import load_model

    lm = load_model("random:tiny", mode)
    inv = weight_inventory(lm.model, mode, lm.dtype)
    assert inv.params == sum(p.numel() for p in load_model("random:tiny", "full").model.parameters())
    assert abs(lm.weights_bytes / inv.theoretical_bytes - 1) <= WEIGHTS_TOLERANCE
    if mode != "full":
        assert inv.quantized_params > 0 and inv.quant_bits == int(mode[0])


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
    assert sorted(df["mode"]) == sorted(ALL_MODES)
    assert (df["error"] == "").all()
    assert df["weights_within_tolerance"].all()
    assert ((df["weights_vs_theory"] - 1).abs() <= WEIGHTS_TOLERANCE).all()
    assert (df["params"].between(134e6, 135e6)).all()
    by = df.set_index("mode")
    assert by.loc["4bit", "weights_bytes"] < by.loc["8bit", "weights_bytes"] < by.loc["full", "weights_bytes"]
    assert (df["decode_tok_s_b1"] > 0).all() and (df["ttft_s"] > 0).all()
    assert by.loc["full", "perplexity"] < 50
    assert "Paris" in by.loc["full", "greedy_answer"]
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
    assert "tok/s b1" in proc.stdout and "seed nvidia-smi MiB" in proc.stdout
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
