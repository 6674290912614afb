"""The engine: stops on its own, batches, keeps params per request, cancels within one step."""

from __future__ import annotations

import queue
import threading
import time

import pytest
from helpers.engine import cancel_after_tokens, steps_after_cancel

from llama_lab.engine import Engine, EngineOverloaded, SamplingParams


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
    with Engine(tiny_model, max_batch_size=8) as engine:
        yield engine


def _prompt(lm, text="Tell me a story."):
    return lm.chat_prompt_ids([{"role": "user", "content": text}])


def test_max_tokens_gives_length(tiny_engine, tiny_model):
    out = tiny_engine.generate(_prompt(tiny_model), SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))
    assert out.finish_reason == "length" and out.completion_tokens == 7 and len(out.token_ids) == 7


def test_tokens_that_show_no_text_yet_are_still_delivered(tiny_engine, tiny_model):
    """A lone byte of a multi-byte character decodes to nothing shown until the character completes; its
    token must still reach the caller (token_ids, usage), not only the text that a later token releases."""
    tok = tiny_model.tokenizer
    lone = next(i for i in range(512) if tok.decode([i]) == "\ufffd")
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias=[(lone, 100.0)])
    out = tiny_engine.generate(_prompt(tiny_model), p)
    assert out.token_ids == [lone] * 6 and out.completion_tokens == 6


def test_greedy_equals_hf_generate(tiny_engine, tiny_model):
    import torch

    ids = _prompt(tiny_model)
    out = tiny_engine.generate(ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    ref = tiny_model.model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                    attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0)
    assert out.token_ids == ref[0, len(ids):].tolist()


def test_concurrent_requests_are_batched_and_match_single(tiny_engine, tiny_model):
    """Requests of different lengths decode together (left-padded) and give their solo answers."""
    prompts = [_prompt(tiny_model, t) for t in ("a", "a much longer question about many things", "mid length")]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    solo = [tiny_engine.generate(p, params).token_ids for p in prompts]
    steps_before = tiny_engine.stats.steps
    results: list = [None] * 3
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, tiny_engine.generate(prompts[i], params)))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.token_ids for r in results] == solo
    # batched: far fewer decode steps than 3 x 9 run one after another
    assert tiny_engine.stats.steps - steps_before < 3 * 9


def test_seeded_sampling_is_per_request(tiny_engine, tiny_model):
    ids = _prompt(tiny_model)
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    alone = tiny_engine.generate(ids, p).token_ids
    noise = [threading.Thread(target=tiny_engine.generate, args=(ids, SamplingParams(max_tokens=16, temperature=1.3, ignore_eos=True)))
             for _ in range(3)]
    for t in noise:
        t.start()
    crowded = tiny_engine.generate(ids, p).token_ids
    for t in noise:
        t.join()
    assert crowded == alone
    assert tiny_engine.generate(ids, SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True)).token_ids != alone


def test_cancel_stops_within_one_step(tiny_engine, tiny_model):
    other = threading.Thread(target=tiny_engine.generate,
                             args=(_prompt(tiny_model, "other"), SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)))
    other.start()
    delta, handle = cancel_after_tokens(tiny_engine, _prompt(tiny_model),
                                        SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True))
    assert delta.finish_reason == "cancelled"
    assert steps_after_cancel(handle) <= 1, f"ran {steps_after_cancel(handle)} steps after cancel"
    other.join(timeout=60)
    deadline = time.time() + 10
    while tiny_engine.stats.running and time.time() < deadline:
        time.sleep(0.01)
    steps = tiny_engine.stats.steps
    time.sleep(0.3)
    assert tiny_engine.stats.steps == steps, "the engine must be idle once nothing is running"


def test_closing_the_stream_iterator_cancels(tiny_engine, tiny_model):
    stream = tiny_engine.stream(_prompt(tiny_model), SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.time() + 5
    while tiny_engine.stats.running and time.time() < deadline:
        time.sleep(0.01)
    assert tiny_engine.stats.running == 0


def test_cancel_during_prefill_skips_the_rest_of_the_prompt(tiny_model):
    with Engine(tiny_model, prefill_chunk=16) as engine:
        long_prompt = tiny_model.tokenizer.encode("word " * 1500)[:1800]
        events: queue.SimpleQueue = queue.SimpleQueue()
        handle = engine.submit(long_prompt, SamplingParams(max_tokens=5), events.put)
        while engine.stats.prefill_chunks == 0:
            time.sleep(0.001)
        handle.cancel()
        delta = events.get(timeout=30)
        assert delta.finish_reason == "cancelled" and delta.completion_tokens == 0
        assert engine.stats.prefill_chunks < len(long_prompt) // 16
        assert engine.stats.steps == 0


def test_queue_limit_raises_overloaded(tiny_model):
    with Engine(tiny_model, max_batch_size=1, max_active=2) as engine:
        sink = queue.SimpleQueue().put
        p = SamplingParams(max_tokens=200, ignore_eos=True)
        handles = [engine.submit(_prompt(tiny_model), p, sink) for _ in range(2)]
        with pytest.raises(EngineOverloaded, match="busy"):
            engine.submit(_prompt(tiny_model), p, sink)
        for h in handles:
            h.cancel()


def test_prompt_longer_than_context_is_refused(tiny_engine, tiny_model):
    with pytest.raises(ValueError, match="maximum context length is 2048"):
        tiny_engine.submit(list(range(5, 2100)), SamplingParams(), lambda d: None)


@pytest.mark.slow
def test_embedded_model_chat_stops_on_its_own(default_model):
    with Engine(default_model) as engine:
        out = engine.generate(default_model.chat_prompt_ids([{"role": "user", "content": "What is 1+1?"}]),
                              SamplingParams(max_tokens=512, temperature=0))
    assert out.finish_reason == "stop"
    assert 0 < out.completion_tokens < 512
    assert "2" in out.text


def test_cancel_interrupts_a_prefill_chunk_mid_forward(tiny_model):
    """With one huge chunk, the cancel must still land inside the forward pass (between layers)."""
    with Engine(tiny_model, prefill_chunk=4096) as engine:
        long_prompt = tiny_model.tokenizer.encode("word " * 2000)[:2000]
        events: queue.SimpleQueue = queue.SimpleQueue()
        entered = threading.Event()
        model = engine.runner.model
        real_layer = model._layer

        def slow_first_layer(i, *args, **kwargs):  # the next layer's check sees the cancel
            if i == 0:
                entered.set()
                time.sleep(0.2)
            return real_layer(i, *args, **kwargs)

        model._layer = slow_first_layer
        try:
            handle = engine.submit(long_prompt, SamplingParams(max_tokens=5), events.put)
            assert entered.wait(30)
            handle.cancel()  # while the first layer runs: the chunk has not finished
            delta = events.get(timeout=30)
        finally:
            del model._layer
        assert delta.finish_reason == "cancelled"
        assert engine.stats.prefill_chunks == 0, "the cancelled chunk must not complete"
