"""The CPU's quantized weights: the kernels against torch, GGUF blocks against the ``gguf`` package, the
load modes, and greedy decoding through the engine against a reference written in plain torch."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.kernels import NARROWER, pass_in_narrower_build
from torch import nn

from llama_lab.model import quant
from llama_lab.model.quant import GROUP, KINDS, QuantEmbedding, QuantLinear, from_gguf_blocks

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module", autouse=True)
def kernels():
    try:
        quant.require_kernels()
    except RuntimeError as exc:
        pytest.skip(f"no C++ toolchain here: {exc}")


def reference_linear(layer: QuantLinear, x: torch.Tensor, prompt: bool = False) -> torch.Tensor:
    """What the kernel computes, in torch: activations quantized per group of 32 to int16, or to int8 from
    ``int8_tile_rows()`` (CPUs without AVX512-BF16) unless the rows are a prompt's, below ``bf16_tile_rows()``;
    else the product with the dequantized weights (in bf16 where ``quant.gemm_dtype()`` says so: inputs rounded;
    the GEMM's output too, the bf16 tiles' not)."""
    w = layer.weight_float()
    if _float_product(x.shape[0]):
        if quant.gemm_dtype() == "bf16":
            y = (x.bfloat16().double() @ w.bfloat16().double().T).float()
            if x.shape[0] >= quant.gemm_rows():
                y = y.bfloat16().float()
        else:
            y = x @ w.T
    else:
        m, k = x.shape
        g = x.reshape(m, k // GROUP, GROUP)
        int8 = quant.int8_tile_rows() <= m < quant.gemm_rows() and not prompt
        dx = g.abs().amax(-1) / (127.0 if int8 else 32767.0)
        inv = torch.where(dx > 0, 1.0 / dx, torch.zeros_like(dx))
        xq = torch.round(g * inv[..., None])
        if layer.kind == "q4":
            q = quant.unpack_nibbles(layer.qs).float()
        elif layer.kind == "q5":
            q = quant.unpack_nibbles(layer.qs).float() + 16 * quant.unpack_bits(layer.qh).float()
        else:
            q = layer.qs.float()
        q = q.reshape(layer.out_features, k // GROUP, GROUP)
        dot = torch.einsum("mgj,ngj->mng", xq.double(), q.double())
        y = torch.einsum("mng,mg,ng->mn", dot, dx.double(), layer.d.double())
        if layer.kind in quant.MINS:
            y = y + g.double().sum(-1) @ quant.minimums(layer.kind, layer.d, layer.m).double().T
        y = y.float()
    return y + layer.bias if layer.bias is not None else y


def _float_product(m: int) -> bool:
    """Whether ``m`` rows take a float product (a GEMM or the bf16 tiles), not integer tiles: int16 prompt products
    (``gemm_dtype() == "int16"``, AVX512-VNNI without BF16) take the int16 tiles at any count."""
    if quant.gemm_dtype() == "int16":
        return False
    return m >= min(quant.bf16_tile_rows(), quant.gemm_rows())


def reference_tolerance(m: int) -> dict:
    """fp32 products agree to float rounding; a bf16 GEMM's output is rounded to 8 bits, and its float sums
    may be ordered otherwise than the reference's, so one bf16 step of the output apart is allowed. The integer
    tiles may round an activation that lies on a tie of its int16 grid the other way (x / d computed in another
    order), which moves an output by d * |w|: ~1e-3 for these inputs."""
    if _float_product(m):
        return dict(rtol=2 ** -7, atol=1e-2) if quant.gemm_dtype() == "bf16" else dict(rtol=1e-4, atol=1e-3)
    return dict(rtol=1e-4, atol=3e-3)


def test_the_gemm_precision_is_chosen_once_per_process_by_the_environment():
    """LLAMA_LAB_GEMM_DTYPE=fp32 gives the exact float product on any CPU (from its threshold's rows on), int16 the
    int16 tiles' (activations rounded to 1/65534 of their group's largest value); a bad value is refused by name."""
    code = ("import torch; from torch import nn; from llama_lab.model import quant;"
            "layer = quant.QuantLinear.from_linear(nn.Linear(64, 40), 'q4'); x = torch.randn(quant.gemm_rows(), 64);"
            "want = x.double() @ layer.weight_float().double().T + layer.bias.double();"
            "print(quant.gemm_dtype(), float((layer(x).double() - want).abs().max() / want.abs().max()))")
    env = {**os.environ, "LLAMA_LAB_GEMM_DTYPE": "fp32"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    dtype, err = out.stdout.split()
    assert dtype == "fp32" and float(err) < 1e-5
    env["LLAMA_LAB_GEMM_DTYPE"] = "int16"  # the int16 tiles at that count too: a single stream's precision
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    dtype, err = out.stdout.split()
    assert dtype == "int16" and 0 < float(err) < 1e-3
    env["LLAMA_LAB_GEMM_DTYPE"] = "fp8"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "LLAMA_LAB_GEMM_DTYPE must be auto, fp32, bf16 or int16, not 'fp8'" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("cflags", NARROWER)
def test_the_narrower_cpu_paths_match_the_reference_too(cflags):
    """The AVX2 loops (built without AVX512 on an AVX512 CPU) and the scalar ones (built without AVX2) run the
    kernel and embedding tests of this file in a child process: CI's CPU only ever builds its own widest path."""
    pass_in_narrower_build(cflags, __file__, "kernel_matches or embedding_rows or k_quant_blocks")


# rows on both sides of each threshold: the int8 tiles (2, without AVX512-BF16), the bf16 tiles (4, with
# AVX512-BF16), either GEMM (32 with a bf16 GEMM, 128 with an fp32 one); 20 rows of K = 2048 take the bf16 tiles'
# blocks of groups (64 groups, 16 per block); odd group counts (K = 96, 160: 3 and 5 groups) the int8 tiles'
# lone last group, 9 and 20 rows their tiles of 8 and a remainder; the int8 tiles' column lanes (VNNI from 2 rows,
# AVX2 from 4) read 16 (8) weight rows at a time and their scales 8 groups at a time: 17 and 20 outputs end in a
# short tile, one group (K = 32) and nine (K = 288) in a short block, 70 rows take two passes of 64
SHAPES = [(1, 64, 32), (2, 96, 40), (2, 32, 20), (5, 288, 17), (3, 576, 1536), (4, 1536, 576), (7, 128, 33),
          (9, 160, 24), (20, 2048, 40), (31, 64, 100),
          (32, 64, 100), (70, 160, 1030), (127, 64, 40), (128, 96, 40)]


def quantized(linear: nn.Linear, kind: str) -> QuantLinear:
    """``linear`` as a packed layer: a kernel kind from float weights, or a GGUF type's blocks (Q4_0 and
    Q5_0 give q4/q5 with implicit minimums)."""
    if kind in KINDS:
        return QuantLinear.from_linear(linear, kind)
    raw = gguf.quants.quantize(linear.weight.detach().numpy(), gguf.GGMLQuantizationType[kind])
    layer = from_gguf_blocks(kind, raw, tuple(linear.weight.shape))
    layer.bias = linear.bias.detach() if linear.bias is not None else None
    return layer


@pytest.mark.parametrize("kind", ["q4", "q5", "q8", "Q4_0", "Q5_0"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_kernel_matches_torch_reference(kind, m, k, n):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    linear = nn.Linear(k, n, bias=n % 2 == 0)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen))
    layer = quantized(linear, kind)
    assert (layer.m is None) == (kind not in quant.MINS)  # Q4_0, Q5_0: implicit minimums
    x = torch.randn(m, k, generator=gen) * 3
    got = layer(x)
    torch.testing.assert_close(got, reference_linear(layer, x), **reference_tolerance(m))
    # and close to the float product it stands for (4-bit weights: a few percent of the output's scale)
    want = nn.functional.linear(x, linear.weight, linear.bias)
    err = (got - want).norm() / want.norm()
    assert err < {"q4": 0.15, "q5": 0.07, "q8": 0.02, "Q4_0": 0.15, "Q5_0": 0.07}[kind], err


@pytest.mark.parametrize("kind", ["q4", "q5", "q8", "Q4_0"])
@pytest.mark.parametrize("m", [2, 37])
def test_kernel_matches_with_a_prompts_rows_in_int16(kind, m):
    """A prompt's rows (``prompt=True``, the engine's prefill) never take the int8 tiles: below the bf16 tiles and
    the GEMM they are the int16 product, whose error against the float weights is the weights' alone."""
    gen = torch.Generator().manual_seed(m)
    linear = nn.Linear(576, 96, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 576, generator=gen))
    layer = quantized(linear, kind)
    x = torch.randn(m, 576, generator=gen) * 3
    got = layer(x, prompt=True)
    torch.testing.assert_close(got, reference_linear(layer, x, prompt=True), **reference_tolerance(m))
    if quant.int8_tile_rows() <= m < min(quant.bf16_tile_rows(), quant.gemm_rows()):  # the int8 tiles are built
        int8 = layer(x)
        torch.testing.assert_close(int8, reference_linear(layer, x), **reference_tolerance(m))
        exact = x.double() @ layer.weight_float().double().T
        assert (got.double() - exact).norm() < 0.1 * (int8.double() - exact).norm()


def test_kernel_matches_its_row_ranges_in_health():
    """``/health``'s ``batch_products`` names the rows each tile kind takes, from the thresholds the build has:
    bf16 tiles from 4 rows with AVX512-BF16 (and a bf16 GEMM), else int8 tiles from 2 on any AVX2 or AVX512
    build, int16 alone on the portable one or with LLAMA_LAB_INT8_TILES=0."""
    from llama_lab.kernels.build import cpu_flags, kernel_path

    gemm, text = quant.gemm_rows(), quant.batch_products()
    bf16_built = "avx512_bf16" in cpu_flags() and "-mno-avx512bf16" not in os.environ.get("LLAMA_LAB_KERNEL_CFLAGS", "")
    if bf16_built and kernel_path().startswith("AVX512"):  # the bf16 tiles' build has no int8 tiles
        assert quant.int8_tile_rows() == gemm
        if quant.gemm_dtype() == "bf16":
            assert quant.bf16_tile_rows() == 4 and text == f"int16 (1-3 rows), bf16 (4-{gemm - 1} rows)"
        else:
            assert text == f"int16 (1-{gemm - 1} rows)"
    elif kernel_path() != "scalar" and os.environ.get("LLAMA_LAB_INT8_TILES", "1") != "0":
        assert quant.bf16_tile_rows() == gemm and quant.int8_tile_rows() == 2
        assert text == f"int16 (1 row), int8 (2-{gemm - 1} rows)"
    else:
        assert quant.int8_tile_rows() == gemm and text == f"int16 (1-{gemm - 1} rows)"


def test_leading_dims_and_dtype_follow_the_input():
    layer = QuantLinear.from_linear(nn.Linear(64, 16), "q8")
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.shape == (2, 3, 16) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["q4", "q5", "q8", "Q4_0", "Q5_0"])
def test_embedding_rows_are_the_dequantized_table(kind):
    table = quantized(nn.Linear(96, 50, bias=False), kind)
    ids = torch.tensor([[0, 49], [7, 7]])
    rows = QuantEmbedding(table)(ids)
    assert rows.shape == (2, 2, 96)
    torch.testing.assert_close(rows, table.weight_float()[ids])
    with pytest.raises(RuntimeError, match="out of range"):
        QuantEmbedding(table)(torch.tensor([50]))


def test_bad_shapes_are_refused_with_a_message():
    layer = QuantLinear.from_linear(nn.Linear(64, 8), "q4")
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.llama_lab.q4_linear(torch.randn(2, 32), layer.qs, layer.d, layer.m)


def test_nibble_packing_round_trips():
    q = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    assert torch.equal(quant.unpack_nibbles(quant.pack_nibbles(q)), q)


def test_fifth_bits_pack_as_gguf_q5_words():
    high = torch.randint(0, 2, (3, 64), dtype=torch.uint8)
    qh = quant.pack_bits(high)
    assert torch.equal(quant.unpack_bits(qh), high)
    words = qh.numpy().view("<u4")  # one little-endian word per group: bit j is element j
    assert all(((int(words[r, g]) >> j) & 1) == high[r, 32 * g + j] for r in range(3) for g in range(2) for j in range(32))


def test_q5_without_its_fifth_bits_is_refused():
    qs, d, m, _ = quant.quantize_q5(torch.randn(4, 64))
    with pytest.raises(ValueError, match="fifth bits"):
        QuantLinear("q5", qs, d, m)
    layer = QuantLinear("q5", qs, d, m, qh=torch.zeros(4, 8, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="qh must be"):
        torch.ops.llama_lab.q5_linear(torch.randn(1, 64), layer.qs, layer.qh[:, :4], layer.d, layer.m)
    with pytest.raises(RuntimeError, match="qh must be"):  # the embedding lookup reads them unchecked too
        torch.ops.llama_lab.q5_rows(torch.tensor([3]), layer.qs, layer.qh[:, :4], layer.d, layer.m)


# ---------------------------------------------------------------- GGUF blocks

@pytest.mark.parametrize("qtype,kind", [("Q4_0", "q4"), ("Q4_1", "q4"), ("Q5_0", "q5"), ("Q5_1", "q5"), ("Q8_0", "q8")])
def test_gguf_blocks_repack_exactly(qtype, kind):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 256)).astype(np.float32)
    t = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(w, t)
    layer = from_gguf_blocks(qtype, raw, (6, 256))
    assert layer.kind == kind
    assert (layer.m is None) == (qtype in ("Q4_0", "Q5_0", "Q8_0"))  # Q4_0, Q5_0: -8 d / -16 d, not stored
    want = gguf.quants.dequantize(raw, t).reshape(6, 256)
    np.testing.assert_allclose(layer.weight_float().numpy(), want, rtol=0, atol=1e-6)


def _random_blocks(qtype: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes for K-quant blocks, with the float16 scales set to small finite values."""
    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, (rows, cols // block)).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    if qtype in ("Q4_K", "Q5_K"):  # d, dmin lead the block
        raw[..., 0:2] = scales
        raw[..., 2:4] = scales[:, ::-1]
    else:  # Q6_K: d trails it
        raw[..., size - 2:] = scales
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype,kind,seed", [("Q4_K", "q4", 1), ("Q5_K", "q5", 3)])
def test_k_quant_blocks_repack_to_groups_of_32(qtype, kind, seed):
    raw = _random_blocks(qtype, 4, 512, seed=seed)
    layer = from_gguf_blocks(qtype, raw, (4, 512))
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(4, 512)
    assert layer.kind == kind
    # the sub-block scale d*sc is rounded to float16: relative error at most 2^-11 of a group's range
    np.testing.assert_allclose(layer.weight_float().numpy(), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    # and the kernel reads the blocks (and q5's fifth bits) where the dequantizer does: one row is int16 activations
    # on every CPU, close to the float product; three take the int8 tiles on AVX2 CPUs, checked against their model
    x = torch.randn(3, 512)
    torch.testing.assert_close(layer(x[:1]), x[:1] @ torch.from_numpy(want).T, rtol=2e-3,
                               atol=2e-3 * float(np.abs(want).max()) * 20)
    torch.testing.assert_close(layer(x), reference_linear(layer, x), **reference_tolerance(3))


def test_other_types_become_q8_close_to_the_source():
    raw = _random_blocks("Q6_K", 3, 256, seed=2)
    layer = from_gguf_blocks("Q6_K", raw, (3, 256))
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q6_K).reshape(3, 256)
    assert layer.kind == "q8"
    err = np.abs(layer.weight_float().numpy() - want).max()
    assert err <= np.abs(want).max() / 127 * 0.51 + 1e-6


def test_q_k_row_order_is_transformers_permutation():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from llama_lab.model.gguf_native import hf_row_order

    w = np.arange(24 * 3).reshape(24, 3)
    want = LlamaTensorProcessor(config={})._reverse_permute_weights(w, 4, 4)
    np.testing.assert_array_equal(w[hf_row_order(24, 4)], want)


# ---------------------------------------------------------------- load modes and the engine

def test_modes_resolve_and_refuse_clearly():
    from llama_lab import load_model
    from llama_lab.model.loading import LoadError

    assert load_model("random:tiny").mode.value == "full"  # auto: not a GGUF
    with pytest.raises(LoadError, match="not a .gguf"):
        load_model("random:tiny", "gguf")
    with pytest.raises(LoadError, match="CPU kernels"):
        load_model("random:tiny", "int4", device="cuda:0")


# Per projection, the format of the "mixed" engine test: a Q4_K_M file's mix (Q5_0 q and k beside a Q8_0 v),
# with Q4_0 gate/up: implicit minimums, and q+k / v / gate+up as the engine's fused runs.
MIXED = {"q_proj": "Q5_0", "k_proj": "Q5_0", "v_proj": "q8", "o_proj": "q5", "gate_proj": "Q4_0", "up_proj": "Q4_0",
         "down_proj": "q4"}


@pytest.mark.parametrize("mode", ["int8", "int4", "q5", "mixed"])
def test_engine_greedy_tokens_match_a_torch_reference(mode, monkeypatch):
    """The engine (fused packed linears, paged cache, kernels) decodes what plain torch computes.

    ``q5`` (a GGUF's Q5_* tensors; no HF load mode makes it) is the int4 model with each decoder linear
    re-quantized to q5 from its dequantized weight; ``mixed`` re-quantizes each as ``MIXED`` says."""
    from llama_lab import load_model
    from llama_lab.engine import Engine
    from llama_lab.engine.sampling import SamplingParams

    mixed = mode == "mixed"
    loaded = load_model("random:tiny", mode if mode in ("int8", "int4") else "int4")
    if mode in ("q5", "mixed"):
        for name, module in list(loaded.model.model.layers.named_modules()):
            if isinstance(module, QuantLinear):
                float_linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                float_linear.weight.data = module.weight_float()
                if module.bias is not None:
                    float_linear.bias.data = module.bias
                parent, _, attr = name.rpartition(".")
                kind = "q5" if mode == "q5" else MIXED[attr]
                setattr(loaded.model.model.layers.get_submodule(parent), attr, quantized(float_linear, kind))
        assert loaded.model.model.layers[0].mlp.down_proj.kind == ("q5" if mode == "q5" else "q4")
        mode = "int4"
    assert loaded.mode.value == mode and "groups of 32" in loaded.weights_format
    assert isinstance(loaded.model.model.layers[0].mlp.down_proj, QuantLinear)
    prompt = loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog, again and again")
    with torch.inference_mode():  # the reference first: the engine fuses (and so shares) the buffers
        monkeypatch.setattr(QuantLinear, "forward", lambda self, x: reference_linear(
            self, x.reshape(-1, self.in_features).float()).reshape(*x.shape[:-1], self.out_features))
        ids = torch.tensor([prompt])
        want = []
        for _ in range(12):
            nxt = int(loaded.model(ids).logits[0, -1].argmax())
            want.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        monkeypatch.undo()
    monkeypatch.setenv("LLAMA_LAB_KV_DTYPE", "fp32")  # the reference keeps fp32 keys and values
    with Engine(loaded, compile=False, max_batch_size=4) as engine:
        got = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)).token_ids
        layer = engine.runner.model.layers[0]
    assert got == want
    # one product per run of one format: q+k and v apart only where v's format differs
    assert [len(sizes) for sizes in layer.qkv_widths] == ([2, 1] if mixed else [3])
    assert [len(sizes) for sizes in layer.gate_up_widths] == [2]


def test_packed_weights_get_a_16_bit_kv_cache(monkeypatch):
    from llama_lab import load_model
    from llama_lab.engine.paged_runner import PagedRunner, PrefillJob

    monkeypatch.delenv("LLAMA_LAB_KV_DTYPE", raising=False)
    runner = PagedRunner(load_model("random:tiny", "int8"), max_batch_size=2, compile=False, kv_cache_tokens=256)
    assert runner.cache.shape.dtype in (torch.float16, torch.bfloat16)
    seq = runner.reserve(20)
    runner.prefill([PrefillJob(seq, list(range(5, 15)), True)], lambda: False)
    logits = runner.decode([seq], [7])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_consecutive_row_views_fuse_without_a_copy():
    """A packed GGUF stores q/k/v (and gate/up) stacked; the engine's fusion then finds views and copies nothing."""
    out, k = 12, 2 * GROUP
    qs = torch.randint(0, 255, (out, k // 2), dtype=torch.uint8)
    d, m = torch.rand(out, k // GROUP).half(), torch.rand(out, k // GROUP).half()
    rows = ((0, 6), (6, 9), (9, 12))
    views = [QuantLinear("q4", qs[a:b], d[a:b], m[a:b]) for a, b in rows]
    fused = quant.fuse(views)
    assert fused.qs.data_ptr() == qs.data_ptr() and fused.m.data_ptr() == m.data_ptr()
    assert torch.equal(fused.qs, qs) and torch.equal(fused.d, d)
    apart = [QuantLinear("q4", qs[a:b].clone(), d[a:b].clone(), m[a:b].clone()) for a, b in rows]
    copied = quant.fuse(apart)  # separate tensors: stacked into one, and the parts become its views
    assert copied.qs.data_ptr() != qs.data_ptr() and torch.equal(copied.qs, qs) and torch.equal(copied.m, m)
    assert apart[1].qs.data_ptr() == copied.qs[6:].data_ptr()
    swapped = quant.fuse([views[1], views[0], views[2]])  # views out of order are not one tensor: copied
    assert torch.equal(swapped.qs, torch.cat([qs[6:9], qs[:6], qs[9:]])) and swapped.qs.data_ptr() != qs.data_ptr()
    implicit = [QuantLinear("q4", qs[a:b], d[a:b]) for a, b in rows]  # Q4_0's: no stored minimums
    assert quant.fuse(implicit).m is None and quant.fuse(implicit).qs.data_ptr() == qs.data_ptr()
    assert quant.fuse([views[0], *implicit[1:]]) is None  # one product takes one kind of minimum


def test_a_packed_file_stacks_each_run_of_one_format():
    """A Q4_K_M layer (Q5_0 q and k, Q8_0 v) stores q+k as one tensor and v apart, as the engine fuses them;
    a Q5_1 beside a Q5_0 (stored and implicit minimums) is not stacked."""
    from llama_lab.model.gguf_native import _stack

    def packed(kind: str, rows: int, mins: bool) -> dict[str, torch.Tensor]:
        parts = {"qs": torch.randint(0, 255, (rows, 32 if kind == "q8" else 16), dtype=torch.uint8),
                 "d": torch.rand(rows, 1).half()}
        if kind == "q5":
            parts["qh"] = torch.randint(0, 255, (rows, 4), dtype=torch.uint8)
        if mins:
            parts["m"] = torch.rand(rows, 1).half()
        return parts

    layer = {"self_attn.q_proj": ("q5", 6, False), "self_attn.k_proj": ("q5", 2, False),
             "self_attn.v_proj": ("q8", 2, False), "mlp.gate_proj": ("q5", 4, True), "mlp.up_proj": ("q5", 4, False)}
    tensors, kinds = {}, {}
    for name, (kind, rows, mins) in layer.items():
        base = f"model.layers.0.{name}"
        kinds[base] = kind
        tensors.update({f"{base}.{part}": value for part, value in packed(kind, rows, mins).items()})
    want_qk = torch.cat([tensors["model.layers.0.self_attn.q_proj.qs"], tensors["model.layers.0.self_attn.k_proj.qs"]])
    stacks = _stack(tensors, kinds, layers=1)
    assert stacks == {"model.layers.0.self_attn.q_k_proj": [["model.layers.0.self_attn.q_proj", 6],
                                                            ["model.layers.0.self_attn.k_proj", 2]]}
    assert torch.equal(tensors["model.layers.0.self_attn.q_k_proj.qs"], want_qk)
    assert "model.layers.0.self_attn.q_k_proj.m" not in tensors and kinds["model.layers.0.self_attn.q_k_proj"] == "q5"
    assert {"model.layers.0.self_attn.v_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"} <= set(kinds)


@pytest.mark.slow
def test_embedded_gguf_is_kept_quantized_and_matches_transformers(default_model):
    """The default load keeps the file's Q4_1/Q8_0 blocks: the same weights transformers dequantizes."""
    from llama_lab import load_model

    assert default_model.mode.value == "gguf" and "Q4_1" in default_model.weights_format
    assert default_model.weights_bytes < 110 * 2**20  # the file is 98 MB; fp32 would be 538 MB
    # q/k/v are row views of one stacked tensor of the packed file, and the engine fuses them without a copy
    from llama_lab.engine.llama import FastLlama

    attn = default_model.model.model.layers[5].self_attn
    assert attn.q_proj.qs.untyped_storage().data_ptr() == attn.v_proj.qs.untyped_storage().data_ptr()
    assert FastLlama(default_model.model, None).layers[5].qkv[0].qs.data_ptr() == attn.q_proj.qs.data_ptr()
    full = load_model("default", "full", dtype="fp32")  # the dequantized weights exactly (bf16 on AVX512-BF16 CPUs)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        packed = default_model.model.model.layers[5].get_submodule(name)
        torch.testing.assert_close(packed.weight_float(), full.model.model.layers[5].get_submodule(name).weight.float(),
                                   rtol=0, atol=0)
    question = " ".join(["Name three colours of the rainbow."] * 20)
    prompt = default_model.chat_prompt_ids([{"role": "user", "content": question}])
    assert len(prompt) >= quant.gemm_rows()  # a prompt takes the GEMM path: the same math as transformers'
    with torch.inference_mode():
        a = default_model.model(torch.tensor([prompt])).logits[0, -1]
        b = full.model(torch.tensor([prompt])).logits[0, -1]
    if quant.gemm_dtype() == "fp32":
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    elif quant.gemm_dtype() == "int16":  # activations to 1/65534 of their group's largest value: measured 3.2e-3
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2)
        assert a.argmax() == b.argmax()
    else:  # bf16 products through 30 layers: within 2% of the logits' range, the same next token
        assert (a - b).abs().max() < 0.02 * (b.max() - b.min()), (a - b).abs().max()
        assert a.argmax() == b.argmax()


def test_int4_from_a_checkpoint_is_built_one_weight_at_a_time_with_the_same_packing(tmp_path):
    """A safetensors checkpoint is packed weight by weight (an 8B model then never exists in floats):
    the same q4 groups as packing the loaded floats, q/k/v stacked so the engine's fusion copies nothing."""
    from transformers import AutoModelForCausalLM

    from llama_lab import load_model
    from llama_lab.engine.llama import FastLlama
    from llama_lab.model.loading import random_preset

    config, tokenizer = random_preset("tiny")
    torch.manual_seed(0)
    floats = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    floats.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), "int4")
    assert "built one weight at a time" in loaded.weights_format
    for name in ("self_attn.k_proj", "mlp.down_proj"):
        got = loaded.model.model.layers[1].get_submodule(name)
        want = quant.quantize_q4(floats.model.layers[1].get_submodule(name).weight)
        assert all(torch.equal(a, b) for a, b in zip((got.qs, got.d, got.m), want))
    table = loaded.model.model.embed_tokens
    assert torch.equal(table.qs, quant.quantize_q8(floats.model.embed_tokens.weight)[0])
    attn = loaded.model.model.layers[0].self_attn
    assert FastLlama(loaded.model, None).layers[0].qkv[0].qs.data_ptr() == attn.q_proj.qs.data_ptr()


def test_random_int4_weights_follow_the_seed():
    """Another process (the background compile) loading the same preset and seed gets the same weights."""
    from llama_lab import load_model

    a, b, c = (load_model("random:tiny", "int4", seed=s) for s in (1, 1, 2))
    qs = [m.model.model.layers[0].mlp.up_proj.qs for m in (a, b, c)]
    assert torch.equal(qs[0], qs[1]) and not torch.equal(qs[0], qs[2])
