"""The fast path: FastLlama over the paged cache, the CPU attention kernel, the compiled decode
step, KV-cache admission, and the transformers fallback for other architectures."""

from __future__ import annotations

import os
import queue
import threading
import time

import httpx
import pytest
import torch
from helpers.engine import cancel_after_tokens, steps_after_cancel, wait_until
from helpers.kernels import NARROWER, pass_in_narrower_build

from llama_lab import load_model
from llama_lab.engine import Engine, SamplingParams, cpu_linear, sampling
from llama_lab.engine.attention import cpu_kernel, reference_attention, reference_prefill
from llama_lab.engine.hf_runner import HFRunner
from llama_lab.engine.paged_runner import PagedRunner, PrefillJob


@pytest.fixture(scope="module")
def tiny32():
    """The tiny preset in fp32, so compiled and eager paths agree to the last bit of a seeded draw."""
    return load_model("random:tiny", dtype="fp32", seed=3)


def _prompt(lm, text="Tell me a story about a lighthouse."):
    return lm.chat_prompt_ids([{"role": "user", "content": text}])


# ---------------------------------------------------------------- attention

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kv_heads,groups,head_dim", [(3, 3, 64), (2, 2, 32), (8, 4, 128), (1, 8, 64), (2, 1, 128)])
def test_cpu_kernel_matches_the_torch_reference(dtype, kv_heads, groups, head_dim):
    kernel = cpu_kernel()
    if kernel is None:
        pytest.skip("the CPU attention kernel could not be built here (no C++ compiler?)")
    torch.manual_seed(0)
    heads, block, blocks = kv_heads * groups, 16, 64
    kc = torch.randn(kv_heads, blocks, block, head_dim, dtype=dtype)
    vc = torch.randn(kv_heads, blocks, block, head_dim, dtype=dtype)
    tables = torch.randperm(blocks)[:64].view(2, 32).to(torch.int32)
    scale = head_dim ** -0.5
    # decode: one token per sequence, at very different positions (one spans several key chunks)
    q = torch.randn(6, heads, head_dim, dtype=dtype)
    rows, pos = torch.tensor([0, 0, 1, 1, 1, 0]), torch.tensor([0, 300, 5, 100, 511, 70])
    got = kernel(q, kc, vc, tables, rows, pos, scale)
    want = reference_attention(q, kc, vc, tables, rows, pos, scale)
    tol = {torch.bfloat16: 2e-2, torch.float16: 5e-3}.get(dtype, 1e-5)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # prefill: ten consecutive tokens of one sequence, causal among themselves
    qp = torch.randn(10, heads, head_dim, dtype=dtype)
    got = kernel(qp, kc, vc, tables, torch.ones(10, dtype=torch.long), torch.arange(40, 50), scale)
    want = reference_prefill(qp, kc, vc, tables[1], 40, scale)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("cflags", NARROWER)
def test_the_narrower_attention_paths_match_the_reference_too(cflags):
    """The AVX512 kernel without vdpbf16ps, the AVX2 one (also bf16 caches, built without AVX512 on an AVX512
    CPU) and the generic one (built without AVX2) pass the test above in a child process: each reads 64 keys
    across 16-token blocks, and the group sizes take 1, 2 and 4 keys and column blocks at once."""
    pass_in_narrower_build(cflags, __file__, "cpu_kernel_matches_the_torch_reference")


# ---------------------------------------------------------------- the model over the paged cache

@pytest.mark.parametrize("packed", [True, False], ids=["onednn-packed", "torch-linear"])
@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "torch-reference"])
def test_paged_forward_matches_transformers(tiny32, kernel, packed, monkeypatch):
    """Chunked, batched prefill over the paged cache gives the model's own logits."""
    if not kernel:
        monkeypatch.setenv("LLAMA_LAB_CPU_KERNEL", "0")
        monkeypatch.setattr("llama_lab.kernels.build._STATE", {})
    monkeypatch.setenv("LLAMA_LAB_CPU_PACK", "1" if packed else "0")
    runner = PagedRunner(tiny32, max_batch_size=4, compile=False, kv_cache_tokens=4096, block_size=16)
    assert runner.attention == ("cpu-kernel" if kernel and cpu_kernel() else "torch-reference")
    if packed and cpu_linear.available() is None:  # every linear (7 per layer, fused to 4, and the head)
        assert runner.eager_linears == f"onednn-packed ({4 * len(runner.model.layers) + 1} weights)"
    elif not packed:
        assert runner.eager_linears == "torch"
    a = _prompt(tiny32, "first prompt, a little longer than the other one")
    b = _prompt(tiny32, "second")
    sa, sb = runner.reserve(len(a) + 8), runner.reserve(len(b) + 8)
    # a in two chunks, the second one batched with all of b
    runner.prefill([PrefillJob(sa, a[:7], False)], lambda: False)
    logits = runner.prefill([PrefillJob(sa, a[7:], True), PrefillJob(sb, b, True)], lambda: False)
    with torch.inference_mode():
        ref_a = tiny32.model(torch.tensor([a])).logits[0, -1]
        ref_b = tiny32.model(torch.tensor([b])).logits[0, -1]
    torch.testing.assert_close(logits[0], ref_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], ref_b, atol=1e-4, rtol=1e-4)
    # one decode step for both, each at its own position
    step = runner.decode([sa, sb], [5, 6])
    with torch.inference_mode():
        ref_a2 = tiny32.model(torch.tensor([a + [5]])).logits[0, -1]
        ref_b2 = tiny32.model(torch.tensor([b + [6]])).logits[0, -1]
    torch.testing.assert_close(step[0], ref_a2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step[1], ref_b2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "default", "rope_theta": 100000.0},
], ids=["llama3", "linear", "default"])
def test_rotary_angles_are_the_models_at_any_position(rope):
    """cos/sin computed per step (no tables) equal the Hugging Face model's, scaling included, up to 128k."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_lab.engine.llama import FastLlama

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=131072, rope_parameters=rope)
    hf = LlamaForCausalLM(config).eval()
    fast = FastLlama(hf, None)
    assert not any(b.numel() > 64 for b in fast.buffers())  # nothing sized by the context
    positions = torch.tensor([0, 1, 17, 8191, 8192, 65000, 131071])
    cos, sin = fast._rotary(positions)
    want_cos, want_sin = hf.model.rotary_emb(torch.zeros(1, len(positions), 64), positions[None])
    torch.testing.assert_close(cos[:, 0], want_cos[0])
    torch.testing.assert_close(sin[:, 0], want_sin[0])


def test_weights_are_shared_not_copied(tiny32):
    """Fusing q/k/v and gate/up leaves the transformers modules as views of the fused tensors."""
    runner = PagedRunner(tiny32, max_batch_size=2, compile=False, kv_cache_tokens=2048)
    layer, hf = runner.model.layers[0], tiny32.model.model.layers[0]
    assert len(layer.qkv) == 1 and len(layer.gate_up) == 1  # one format: one product each
    assert hf.self_attn.q_proj.weight.data_ptr() == layer.qkv[0].weight.data_ptr()
    assert hf.mlp.gate_proj.weight.untyped_storage().data_ptr() == layer.gate_up[0].weight.untyped_storage().data_ptr()


# ---------------------------------------------------------------- the compiled decode step

def test_compiled_decode_gives_the_eager_tokens(tiny32):
    ids = _prompt(tiny32)
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    with Engine(tiny32, compile=False) as eager:
        want = [eager.generate(ids, p).token_ids for p in (greedy, seeded)]
    with Engine(tiny32, compile=True, max_batch_size=8) as compiled:
        assert compiled.describe()["decode"].startswith("compiled"), compiled.describe()
        got = [compiled.generate(ids, p).token_ids for p in (greedy, seeded)]
        # batches of up to four rows use the same graph (no recompile per batch size); bigger ones
        # decode eagerly on the CPU, with the same tokens
        outs: list = [None] * 6
        threads = [threading.Thread(target=lambda i=i: outs.__setitem__(i, compiled.generate(ids, seeded)))
                   for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert got == want
    assert all(o.token_ids == want[1] for o in outs)
    # the next start loads the package the first one left (built there, or by an earlier run), and
    # leaves no unpacked copy of it in the temp dir (a killed server would never remove one)
    import tempfile
    from pathlib import Path

    before = set(Path(tempfile.gettempdir()).iterdir())
    with Engine(tiny32, compile=True) as again:
        assert again.describe()["compiled_package"]["reused"] is True, again.describe()
        assert not {p.name for p in set(Path(tempfile.gettempdir()).iterdir()) - before
                    if p.name.startswith(("aotinductor_", "llama_lab-aoti-"))}
        assert again.generate(ids, greedy).token_ids == want[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_step_built_in_the_background_is_switched_to_between_steps(tiny32):
    """A first start answers at once, eagerly, and moves to the package another process builds."""
    import dataclasses
    import uuid

    lm = dataclasses.replace(tiny32, name=f"background-{uuid.uuid4().hex[:8]}")  # a package nobody built yet
    ids = _prompt(lm)
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with Engine(lm, compile=True, compile_in_background=True, max_batch_size=4) as engine:
        assert engine.describe()["decode"] == "eager (the compiled step is being built in the background)"
        eager = engine.generate(ids, greedy).token_ids
        wait_until(lambda: engine.describe()["decode"] != "eager (the compiled step is being built in the background)",
                   timeout=540, interval=0.5)
        described = engine.describe()
        assert described["decode"].startswith("compiled ahead of time"), described
        assert described["compile_error"] is None and described["compiled_package"]["reused"] is False
        assert engine.generate(ids, greedy).token_ids == eager
    from pathlib import Path

    Path(described["compiled_package"]["path"]).unlink()


def test_a_failed_background_build_leaves_the_engine_eager_and_says_why(tiny32):
    import dataclasses

    lm = dataclasses.replace(tiny32, name="background-broken", source="random:no-such-preset")
    with Engine(lm, compile=True, compile_in_background=True, max_batch_size=4) as engine:
        ids = _prompt(lm)
        assert engine.generate(ids, SamplingParams(max_tokens=4, ignore_eos=True)).completion_tokens == 4
        wait_until(lambda: engine.describe()["compile_error"], timeout=120, interval=0.2)
        described = engine.describe()
        assert described["decode"] == "eager" and "exited with" in described["compile_error"]
        assert "no-such-preset" in described["compile_error"]
        assert engine.generate(ids, SamplingParams(max_tokens=4, ignore_eos=True)).completion_tokens == 4


def test_package_key_follows_the_weights(tiny32):
    from llama_lab.engine.compiled_step import package_key

    model = PagedRunner(tiny32, max_batch_size=2, compile=False, kv_cache_tokens=2048).model
    key = package_key(model, shape_constants=(1,), max_rows=4)
    assert package_key(model, shape_constants=(1,), max_rows=4) == key
    assert package_key(model, shape_constants=(2,), max_rows=4) != key
    assert package_key(model, shape_constants=(1,), max_rows=8) != key
    other = load_model("random:tiny", dtype="fp32", seed=4)  # same shapes, other weights
    assert package_key(PagedRunner(other, max_batch_size=2, compile=False, kv_cache_tokens=2048).model,
                       shape_constants=(1,), max_rows=4) != key


def test_a_broken_package_is_rebuilt_and_replaces_the_models_older_ones(tiny32, monkeypatch, tmp_path, caplog):
    from llama_lab.engine import compiled_step

    monkeypatch.setenv("LLAMA_LAB_CACHE", str(tmp_path))
    compiled = tmp_path / "compiled"
    compiled.mkdir()
    built: list[str] = []
    real_key = compiled_step.package_key
    monkeypatch.setattr(compiled_step, "package_key", lambda *a, **k: built.append(real_key(*a, **k)) or built[-1])
    stem = "random-tiny"
    assert tiny32.name == stem
    old = compiled / f"{stem}-{'0' * 20}.pt2"  # the same model's package from an earlier version
    neighbour = compiled / f"{stem}-other-{'0' * 20}.pt2"  # another model whose name starts alike
    for f in (old, neighbour):
        f.write_bytes(b"old")
    runner = PagedRunner(tiny32, max_batch_size=2, compile=True, kv_cache_tokens=2048)
    runner.warm_up()
    key = built[-1]
    path = compiled / f"{stem}-{key}.pt2"
    assert runner.package["path"] == str(path) and runner.package["reused"] is False
    # now break it: the next start says so, builds it again and decodes compiled
    path.write_bytes(b"half a file")
    runner = PagedRunner(tiny32, max_batch_size=2, compile=True, kv_cache_tokens=2048)
    with caplog.at_level("WARNING", logger="llama_lab.engine.compiled_step"):
        runner.warm_up()
    assert "compiling again" in caplog.text
    assert runner.package["path"] == str(path) and runner.package["reused"] is False
    assert runner.mode.startswith("compiled")
    assert sorted(p.name for p in compiled.iterdir()) == sorted([path.name, neighbour.name])


def test_no_compiled_step_without_room_on_disk(tiny32, monkeypatch, tmp_path):
    import shutil
    from types import SimpleNamespace

    monkeypatch.setenv("LLAMA_LAB_CACHE", str(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=10**12 - 1024, free=1024))
    with Engine(tiny32, compile=True) as engine:
        assert engine.describe()["decode"] == "eager"
        assert "GiB free" in engine.describe()["compile_error"]
        out = engine.generate(_prompt(tiny32), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        assert out.completion_tokens == 4
    assert not list((tmp_path / "compiled").glob("*.pt2"))


def test_cancel_lands_within_one_step_on_the_compiled_path(tiny32):
    with Engine(tiny32, compile=True) as engine:
        delta, handle = cancel_after_tokens(engine, _prompt(tiny32),
                                            SamplingParams(max_tokens=100_000, temperature=0, ignore_eos=True))
        assert delta.finish_reason == "cancelled"
        assert steps_after_cancel(handle) <= 1


# ---------------------------------------------------------------- the KV cache

def test_requests_wait_for_cache_blocks_and_reuse_them(tiny_model):
    """A cache with room for one request at a time: the second waits, then gets the blocks back."""
    with Engine(tiny_model, compile=False, kv_cache_tokens=tiny_model.context_length) as engine:
        cache = engine.runner.cache
        free0 = cache.free_blocks
        ids = _prompt(tiny_model)
        big = SamplingParams(max_tokens=tiny_model.context_length - len(ids) - 1, temperature=0, ignore_eos=True)
        first = queue.SimpleQueue()
        h1 = engine.submit(ids, big, first.put)
        time.sleep(0.2)
        second = engine.generate  # blocks until admitted and done
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("out", second(ids, SamplingParams(max_tokens=3, temperature=0))))
        t.start()
        time.sleep(0.5)
        assert engine.stats.waiting == 1, "the second request must wait for blocks"
        h1.cancel()
        t.join(60)
        assert result["out"].completion_tokens >= 1
        deadline = time.time() + 10
        while cache.free_blocks != free0 and time.time() < deadline:
            time.sleep(0.01)
        assert cache.free_blocks == free0, "every block comes back"


def test_speed_does_not_depend_on_the_cache_growing(tiny_model):
    """No per-step concatenation: the cache tensors are allocated once and never replaced."""
    with Engine(tiny_model, compile=False) as engine:
        before = [t.data_ptr() for t in engine.runner.cache.k]
        engine.generate(_prompt(tiny_model), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        assert [t.data_ptr() for t in engine.runner.cache.k] == before


# ---------------------------------------------------------------- other architectures, other devices

def test_other_architectures_use_the_transformers_runner():
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    from llama_lab.model.loading import LoadedModel, shipped_tokenizer_dir
    from llama_lab.model.presets import LoadMode

    tok = AutoTokenizer.from_pretrained(shipped_tokenizer_dir())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2,
                                                        n_positions=512, eos_token_id=tok.eos_token_id)).eval()
    lm = LoadedModel(model=model, tokenizer=tok, stop_token_ids=frozenset({tok.eos_token_id}), device=torch.device("cpu"),
                     dtype=torch.float32, mode=LoadMode.FULL, source="test", name="gpt2-tiny", random_weights=True,
                     load_seconds=0.0, weights_bytes=0, rss_delta_bytes=0, device_bytes=None, context_length=512)
    ids = tok.encode("hello there")
    with Engine(lm, compile=True) as engine:
        assert isinstance(engine.runner, HFRunner)
        outs: list = [None] * 2
        ths = [threading.Thread(target=lambda i=i: outs.__setitem__(i, engine.generate(
            ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))) for i in range(2)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0)
    assert outs[0].token_ids == outs[1].token_ids == ref[0, len(ids):].tolist()


def test_the_engine_makes_generators_on_the_models_device(tiny_model, monkeypatch):
    """Reintroducing the GPU bug (a CPU generator for a CUDA model) fails here, on a CPU.

    The runner is a stand-in that says its model lives on the meta device; every generator the
    engine asks for must be on that device.
    """
    asked: list[torch.device] = []
    monkeypatch.setattr(sampling, "make_generator",
                        lambda device, seed: asked.append(torch.device(device)) or torch.Generator().manual_seed(seed))

    class MetaRunner:
        device, mode, attention, compile_error = torch.device("meta"), "stub", "stub", None

        def warm_up(self, defer=None):
            return 0.0

        def reserve(self, tokens, prompt=()):
            return object()

        def release(self, seq):
            pass

        def prefill(self, jobs, cancelled):
            return torch.empty(len(jobs), len(tiny_model.tokenizer), device="meta")

    monkeypatch.setattr("llama_lab.engine.engine.make_runner", lambda *a, **k: MetaRunner())
    with Engine(tiny_model) as engine:
        out = queue.SimpleQueue()
        engine.submit(_prompt(tiny_model), SamplingParams(temperature=0.7, seed=1), out.put)
        engine.submit(_prompt(tiny_model), SamplingParams(temperature=0.7), out.put)
        for _ in range(2):
            assert out.get(timeout=30).finish_reason is not None  # meta logits have no values: it ends in an error
    assert asked == [torch.device("meta")] * 2


# ---------------------------------------------------------------- the embedded model, compiled, end to end

@pytest.mark.slow
def test_the_compiled_step_reads_the_models_own_packed_weights():
    """Over packed quantized weights every constant of the package is one of the model's tensors: the
    package runs on them (its weights file is never loaded, so they are in memory once), with the
    eager engine's tokens. Float weights are pre-packed for the GEMM at compile time: that package
    keeps its own copy (``tiny32``'s, in the tests above)."""
    loaded = load_model("random:tiny", "int4", seed=5)
    ids = _prompt(loaded)
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with Engine(loaded, compile=False) as eager:
        want = eager.generate(ids, greedy).token_ids
    for _ in range(2):  # built, then loaded
        with Engine(loaded, compile=True, max_batch_size=4) as compiled:
            package = compiled.describe()["compiled_package"]
            assert package["shares_weights"] is True, compiled.describe()
            assert compiled.generate(ids, greedy).token_ids == want
    assert package["reused"] is True


@pytest.mark.slow
def test_compiled_server_on_the_embedded_model(cli_server, default_model):
    """``llama-lab serve`` answers at once on a first start (eagerly, while another process builds the
    compiled step), switches to the compiled step when it is ready, answers like the eager engine on
    both, and stops within one step when a streaming client leaves."""
    proc, url = cli_server("--model", "default", "--compile", timeout=900)
    building = "eager (the compiled step is being built in the background)"
    engine = httpx.get(url + "/health").json()["engine"]
    assert engine["decode"] == building or engine["decode"].startswith("compiled"), engine  # first start, or not
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 40,
            "temperature": 0}
    ids = default_model.chat_prompt_ids(body["messages"])
    with Engine(default_model, compile=False) as eager:
        want = eager.generate(ids, SamplingParams(max_tokens=40, temperature=0))
    answers = [httpx.post(url + "/v1/chat/completions", json=body, timeout=300).json()]
    engine = wait_until(lambda: (e := httpx.get(url + "/health").json()["engine"])["decode"] != building and e,
                        timeout=600, interval=1.0)
    assert engine["decode"].startswith("compiled") and engine["compile_error"] is None, engine
    assert engine["compiled_package"]["shares_weights"] is True, engine  # the GGUF's weights, in memory once
    assert engine["cpu_kernels"] in ("AVX512 + VNNI", "AVX512", "AVX2", "scalar"), engine  # says which loops run
    assert engine["prompt_gemm"] in ("bf16", "fp32", "int16"), engine  # and the precision of a prompt's products
    assert engine["batch_products"].startswith("int16 (1"), engine  # and a decode batch's, by rows
    answers.append(httpx.post(url + "/v1/chat/completions", json=body, timeout=300).json())
    for answer in answers:
        assert answer["choices"][0]["finish_reason"] == "stop"
        assert answer["choices"][0]["message"]["content"] == want.text
    # a client that leaves mid-stream: right after it left, the step counter moves at most one more step
    long = {"messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=long, timeout=300) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i == 10:
                break
    steps_at_leave = _steps(url)
    time.sleep(1.5)
    assert _steps(url) - steps_at_leave <= 1


def _steps(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("llama_lab_engine_steps ")))


@pytest.mark.parametrize("start", ["unset", "torch-default", "user"])
def test_inductor_cache_dir_is_ours_unless_the_user_chose_one(start, monkeypatch, tmp_path):
    """Torch writes its /tmp default into the env the first time anything asks for the cache dir;
    that must not stop the kernels from being cached beside the models, but a user's choice wins."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from llama_lab.engine.paged_runner import _use_persistent_compile_cache

    monkeypatch.setenv("LLAMA_LAB_CACHE", str(tmp_path / "cache"))
    if start == "unset":
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir() if start == "torch-default" else str(tmp_path / "mine"))
    _use_persistent_compile_cache()
    want = tmp_path / ("mine" if start == "user" else "cache/inductor")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(want)


def test_no_compile_when_the_packed_copy_would_not_fit(tiny32, monkeypatch):
    """A model too big for a second (packed) copy in free memory decodes eagerly and says why."""
    import psutil

    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=1024))
    runner = PagedRunner(tiny32, max_batch_size=2, compile=True, kv_cache_tokens=2048)
    assert runner.compiled is None and runner.mode == "eager"
    assert "free memory" in runner.compile_error
    assert runner.eager_linears == "torch"  # the oneDNN copy has the same guard


# ---------------------------------------------------------------- prefix caching

def test_the_next_turn_of_a_chat_reuses_its_history(tiny32):
    """A follow-up turn takes the conversation's blocks from the cache and answers exactly as a full prefill."""
    history = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and the sea. " * 12}]
    first = tiny32.chat_prompt_ids(history)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with Engine(tiny32, compile=False, prefix_caching=False) as plain:
        answer = plain.generate(first, greedy)
        follow = tiny32.chat_prompt_ids(history + [{"role": "assistant", "content": answer.text},
                                                   {"role": "user", "content": "And then?"}])
        want = plain.generate(follow, greedy).token_ids
        assert plain.stats.prompt_tokens_cached == 0 and plain.describe()["prefix_caching"] is False
    common = next(i for i, (x, y) in enumerate(zip(first, follow)) if x != y)
    block = 64
    assert common >= 2 * block, "the test needs a history of a few blocks"
    with Engine(tiny32, compile=False) as engine:
        assert engine.generate(first, greedy).token_ids == answer.token_ids
        got = engine.generate(follow, greedy)
        cached = engine.stats.prompt_tokens_cached
    assert common // block * block <= cached < len(follow)
    assert got.token_ids == want


def test_a_resent_prompt_computes_only_its_last_token_and_answers_the_same(tiny32):
    """A regenerated answer: the block holding the prompt's tail also holds the old answer's first tokens, and
    the prompt's share of it is copied, not computed (whole blocks alone recomputed up to 15 tokens)."""
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=True)
    prompt = tiny32.chat_prompt_ids([{"role": "user", "content": "Tell me about lighthouses. " * 5}])
    if (len(prompt) - 1) % 16 == 0:
        prompt = prompt + prompt[-1:]
    edited = prompt[:-3] + [prompt[-3] + 1] + prompt[-2:]  # leaves the cached prompt inside its last block

    def logprobs(result) -> list[float]:
        return [entry["logprob"] for entry in result.logprobs]

    with Engine(tiny32, compile=False, prefix_caching=False) as plain:
        want = [plain.generate(p, greedy) for p in (prompt, edited)]
    with Engine(tiny32, compile=False) as engine:
        engine.generate(prompt, greedy)
        assert engine.stats.prompt_tokens_cached == 0
        got = [engine.generate(p, greedy) for p in (prompt, edited)]
        assert engine.stats.prompt_tokens_cached == (len(prompt) - 1) + (len(prompt) - 3)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert logprobs(g) == pytest.approx(logprobs(w), abs=1e-4)  # the copied keys and values are the computed ones


def test_requests_share_a_system_prompt_while_they_run(tiny32):
    system = {"role": "system", "content": "You are a terse assistant who answers in one line. " * 15}
    prompts = [tiny32.chat_prompt_ids([system, {"role": "user", "content": q}]) for q in ("Hi", "Who are you?")]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    with Engine(tiny32, compile=False, prefix_caching=False) as plain:
        want = plain.generate(prompts[1], greedy).token_ids
    with Engine(tiny32, compile=False) as engine:
        events: queue.SimpleQueue = queue.SimpleQueue()
        running = engine.submit(prompts[0], SamplingParams(max_tokens=100_000, temperature=0, ignore_eos=True),
                                events.put)
        events.get(timeout=60)  # its first token: its prompt is in the cache, and named for others to use
        got = engine.generate(prompts[1], greedy)
        assert engine.stats.prompt_tokens_cached >= 64
        running.cancel()
    assert got.token_ids == want
