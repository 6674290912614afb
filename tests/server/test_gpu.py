"""The GPU path (``pytest -m gpu``): sampling, quantized loads, NVML, the server and the stop button on CUDA.

Skipped, with the reason, where CUDA is absent; CI has no GPU, so these run on a GPU box.
Random-weight presets keep them offline (their tokenizer ships with the package).
"""

from __future__ import annotations

import gc
import threading
import time

import httpx
import pytest
import torch
from helpers.engine import cancel_after_tokens, steps_after_cancel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


@pytest.fixture(scope="module")
def cuda_model():
    from llama_lab import load_model

    return load_model("random:smollm2-135m", "full", device="cuda:0")


@pytest.fixture(scope="module")
def cuda_engine(cuda_model):
    from llama_lab.engine import Engine

    with Engine(cuda_model, compile=True, max_batch_size=16) as engine:
        yield engine


def _prompt(lm, text="Tell me a story about the sea."):
    return lm.chat_prompt_ids([{"role": "user", "content": text}])


def test_seeded_sampling_on_cuda_is_reproducible_and_per_request(cuda_engine, cuda_model):
    from llama_lab.engine import SamplingParams

    ids = _prompt(cuda_model)
    p = SamplingParams(max_tokens=24, temperature=0.7, top_p=0.9, seed=1234, ignore_eos=True)
    alone = cuda_engine.generate(ids, p).token_ids
    noise = [threading.Thread(target=cuda_engine.generate, args=(ids, SamplingParams(max_tokens=24, temperature=1.2,
                                                                                      ignore_eos=True)))
             for _ in range(3)]
    for t in noise:
        t.start()
    crowded = cuda_engine.generate(ids, p).token_ids
    for t in noise:
        t.join()
    assert len(alone) == 24 and crowded == alone
    assert cuda_engine.generate(ids, SamplingParams(max_tokens=24, temperature=0.7, seed=99, ignore_eos=True)).token_ids != alone


def test_penalties_logprobs_and_n_on_cuda(cuda_engine, cuda_model):
    from llama_lab.engine import SamplingParams

    ids = _prompt(cuda_model)
    out = cuda_engine.generate(ids, SamplingParams(max_tokens=12, temperature=0.9, repetition_penalty=1.3,
                                                   presence_penalty=0.5, frequency_penalty=0.5, logprobs=True,
                                                   top_logprobs=3, seed=5, ignore_eos=True))
    assert out.completion_tokens == 12 and len(out.logprobs) == 12
    assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 3 for e in out.logprobs)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert cuda_engine.generate(ids, greedy).token_ids == cuda_engine.generate(ids, greedy).token_ids


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_random_preset_loads_and_generates_on_cuda(mode):
    pytest.importorskip("bitsandbytes")
    from llama_lab import load_model
    from llama_lab.engine import Engine, SamplingParams

    lm = load_model("random:smollm2-135m", mode, device="cuda:0")
    assert lm.device.type == "cuda" and getattr(lm.model, f"is_loaded_in_{mode[0]}bit")
    with Engine(lm) as engine:
        out = engine.generate(_prompt(lm), SamplingParams(max_tokens=8, temperature=0.7, seed=1, ignore_eos=True))
    assert out.completion_tokens == 8


def test_nvml_sees_device_memory_rise_by_the_weights_during_a_load():
    from llama_lab import load_model
    from llama_lab.profiling import Monitor

    # memory that earlier tests freed stays in torch's caching allocator, where the driver (and NVML) still
    # counts it and a new load would reuse it unseen: hand it back first
    gc.collect()
    torch.cuda.empty_cache()
    with Monitor(interval_s=0.05) as mon:
        time.sleep(0.3)
        with mon.phase("load"):
            lm = load_model("random:llama-3.2-1b", "full", device="cuda:0")
        time.sleep(0.3)
    assert mon.backend == "nvml"
    df = mon.to_frame()
    before = df[df["t"] < mon.phases[0].start]["gpu_mem_used_bytes"].min()
    after = df[df["t"] > mon.phases[0].end]["gpu_mem_used_bytes"].max()
    assert after - before >= lm.weights_bytes * 0.95


@pytest.fixture(scope="module")
def cuda_server(cuda_engine):
    from llama_lab import serve

    with serve(cuda_engine, port=0, log_level="warning") as server:
        yield server


def test_server_on_cuda_answers_the_openai_sdk_with_its_default_temperature(cuda_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=cuda_server.base_url, api_key="x")
    messages = [{"role": "user", "content": "1+1等于几?"}]
    reply = client.chat.completions.create(model="llama-3-chinese", messages=messages, max_tokens=16)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="llama-3-chinese", messages=messages, max_tokens=16, stream=True))
    assert chunks and any(c.choices and c.choices[0].finish_reason for c in chunks)
    health = httpx.get(cuda_server.url + "/health").json()
    assert health["device"].startswith("cuda")


def test_stop_button_on_cuda_costs_at_most_one_decode_step(cuda_engine, cuda_model):
    from llama_lab.engine import SamplingParams

    delta, handle = cancel_after_tokens(cuda_engine, _prompt(cuda_model),
                                        SamplingParams(max_tokens=100_000, temperature=0.7, ignore_eos=True), tokens=10,
                                        timeout=120)
    assert delta.finish_reason == "cancelled" and steps_after_cancel(handle) <= 1
