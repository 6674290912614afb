"""Incremental detokenization, stop strings and batched, per-row, device-neutral sampling."""

from __future__ import annotations

import math

import pytest
import torch

from llama_lab.engine import sampling
from llama_lab.engine.detokenizer import Detokenizer
from llama_lab.engine.sampling import (RowState, SamplingParams, apply_penalties, choose_tokens, logprob_entries,
                                      logprob_tensors, record_tokens)

CHINESE = "1+1等于几？答案是二。我们再来看看“中文字符”被拆成多个字节的情况：龘、𠮷、😀。"
CPU = torch.device("cpu")


def _feed(tok, text, stop=()):
    ids = tok.encode(text, add_special_tokens=False)
    det = Detokenizer(tok, prompt_ids=tok.encode("前文", add_special_tokens=False), stop=stop)
    deltas = [det.add(t) for t in ids]
    deltas.append(det.flush())
    return ids, deltas, det


def test_chinese_stream_yields_only_whole_characters(tiny_model):
    tok = tiny_model.tokenizer
    ids, deltas, _ = _feed(tok, CHINESE)
    assert len(ids) > len(CHINESE) / 2, "byte-level BPE splits CJK characters across tokens"
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == CHINESE
    assert any(d == "" for d in deltas), "some tokens complete no character and must yield nothing"


def test_stop_string_cuts_text_and_is_not_returned(tiny_model):
    tok = tiny_model.tokenizer
    _, deltas, det = _feed(tok, "Hello world. STOP here and more", stop=("STOP",))
    assert "".join(deltas) == "Hello world. "
    assert det.stopped


def test_partial_stop_prefix_is_held_then_released(tiny_model):
    tok = tiny_model.tokenizer
    _, deltas, det = _feed(tok, "a ST b STO c", stop=("STOP",))
    assert "".join(deltas) == "a ST b STO c"
    assert not det.stopped


def test_stop_string_spanning_tokens_in_chinese(tiny_model):
    tok = tiny_model.tokenizer
    _, deltas, _ = _feed(tok, "答案是二。结束吧后面不要", stop=("结束",))
    assert "".join(deltas) == "答案是二。"


# ---------------------------------------------------------------- choosing tokens

def _rows(params, n=1, seed=0, vocab=5, prompt=()):
    return [RowState(params, prompt, vocab, CPU, seed + i) for i in range(n)]


def _draws(logits, params, n=200):
    rows = _rows(params, n=n, vocab=logits.numel())
    return choose_tokens(logits.expand(n, -1).clone(), rows).tolist()


def test_top_k_is_respected_and_seeds_reproduce():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0, 1.0])
    draws = set(_draws(logits, SamplingParams(temperature=1.0, top_k=2)))
    assert draws == {1, 2}
    p = SamplingParams(temperature=1.5, seed=42)
    a, b = RowState(p, (), 5, CPU, 42), RowState(p, (), 5, CPU, 42)
    seq_a = [int(choose_tokens(logits[None].clone(), [a])[0]) for _ in range(20)]
    seq_b = [int(choose_tokens(logits[None].clone(), [b])[0]) for _ in range(20)]
    assert seq_a == seq_b and len(set(seq_a)) > 1


def test_top_p_keeps_the_crossing_token():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_p=0.7))) == {0, 1}


def test_top_p_beyond_the_candidate_window_is_exact():
    """A flat distribution whose nucleus is larger than the first candidates falls back to a full sort."""
    vocab = sampling.TOP_P_CANDIDATES * 4
    logits = torch.zeros(vocab)
    draws = _draws(logits, SamplingParams(temperature=1.0, top_p=0.9), n=400)
    assert max(draws) >= sampling.TOP_P_CANDIDATES  # tokens outside the first window are reachable
    assert len(set(draws)) > sampling.TOP_P_CANDIDATES


def test_sampled_frequencies_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    draws = _draws(torch.log(probs), SamplingParams(temperature=1.0, top_p=1.0), n=3000)
    freq = [draws.count(i) / len(draws) for i in range(3)]
    assert freq == pytest.approx(probs.tolist(), abs=0.04)


def test_greedy_and_sampled_rows_in_one_batch():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    rows = [RowState(SamplingParams(temperature=0), (), 3, CPU, 0), RowState(SamplingParams(temperature=0.7, top_k=1), (), 3, CPU, 1),
            RowState(SamplingParams(temperature=1.0, top_p=0.5), (), 3, CPU, 2)]
    assert choose_tokens(logits, rows).tolist() == [1, 0, 2]


def test_penalties_follow_openai_and_hf_definitions():
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.1)
    row = RowState(p, [0, 1], 3, CPU, 0)
    for token in (0, 0, 0, 2):
        record_tokens([row], torch.tensor([token]))
    out = apply_penalties(torch.tensor([[2.0, -2.0, 1.0]]), [row])
    # HF: positive logits divided, negative multiplied (prompt and output); OpenAI: -= presence*[c>0] + frequency*c
    assert out[0].tolist() == pytest.approx([2.0 / 2 - 0.5 - 0.3, -2.0 * 2, 1.0 / 2 - 0.5 - 0.1])


@pytest.mark.parametrize("extreme", [dict(repetition_penalty=5e-324, top_p=5e-324), dict(temperature=1e-300),
                                     dict(repetition_penalty=1e300, presence_penalty=2, frequency_penalty=-2),
                                     dict(temperature=2.0, top_k=1_000_000, top_p=1.0)])
def test_extreme_but_valid_values_stay_finite(extreme):
    logits = torch.tensor([[3.0, -1e4, 0.5, float("-inf"), 2.0]])
    row = RowState(SamplingParams(**extreme), [0, 1, 2], 5, CPU, 7)
    record_tokens([row], torch.tensor([0]))
    token = int(choose_tokens(logits.clone(), [row])[0])
    assert 0 <= token < 5 and token != 3


def test_logprobs_are_the_models_before_adjustments(tiny_model):
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    row = RowState(SamplingParams(temperature=0, logprobs=True, top_logprobs=2), (), 4, CPU, 0)
    tokens = choose_tokens(logits.clone(), [row])
    entry = logprob_entries(logits, tokens, [row], tiny_model.tokenizer)[0]
    expected = torch.log_softmax(logits[0], -1)
    assert entry["token_id"] == 2 and entry["logprob"] == pytest.approx(float(expected[2]))
    assert [t["token_id"] for t in entry["top_logprobs"]] == [2, 1]


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(temperature=math.nan), dict(top_p=0),
                                 dict(top_k=-1), dict(repetition_penalty=0), dict(repetition_penalty=math.inf),
                                 dict(presence_penalty=math.nan), dict(top_logprobs=21)])
def test_invalid_params_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


# ---------------------------------------------------------------- the GPU bug, made impossible on a CPU

def test_generator_on_another_device_than_the_logits_is_refused():
    """The bug that broke every sampled request on CUDA: a CPU generator driving the GPU batch."""
    row = RowState(SamplingParams(temperature=0.7), (), 5, CPU, 0)
    assert row.generator.device == CPU
    with pytest.raises(RuntimeError, match="generator lives on cpu but the logits on meta"):
        choose_tokens(torch.zeros(1, 5, device="meta"), [row])


def test_sampling_never_mixes_devices(monkeypatch):
    """The whole sampling path on the meta device: any tensor it makes elsewhere (a CPU default) fails.

    Meta tensors have no data, so the two host decisions (a generator draw's device check, the
    rare full-sort branch) are replaced here: the generator is a CPU stand-in (generators cannot
    live on meta) and the full-sort branch is forced on, so its operations are checked too.
    """
    meta = torch.device("meta")
    monkeypatch.setattr(sampling, "make_generator", lambda device, seed: torch.Generator().manual_seed(seed))
    monkeypatch.setattr(sampling, "_check_generator", lambda row, device: None)
    monkeypatch.setattr(sampling, "_any", lambda flags: True)
    all_kinds = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.9, seed=1),
                 SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=0.8),
                 SamplingParams(temperature=0.9, top_p=0.5, repetition_penalty=1.2, presence_penalty=0.3,
                                frequency_penalty=0.2, logprobs=True, top_logprobs=3)]
    rows = [RowState(p, [1, 2, 3], 500, meta, i) for i, p in enumerate(all_kinds)]
    logits = torch.empty(len(rows), 500, device=meta)
    tokens = choose_tokens(logits, rows)
    assert tokens.device == meta and tokens.shape == (len(rows),)
    record_tokens(rows, tokens)
    chosen, top_vals, top_ids = logprob_tensors(logits, tokens, 3)
    assert chosen.device == top_vals.device == top_ids.device == meta


def test_a_cpu_tensor_in_the_sampling_path_would_fail_the_meta_run():
    """The guard above can fail: a 1-D CPU tensor meeting a meta batch raises."""
    with pytest.raises((RuntimeError, ValueError)):
        torch.empty(2, 5, device="meta") / torch.tensor([0.7, 1.0])[:, None]


@pytest.mark.parametrize("vocab", [64, 100, 49152])
def test_the_cpu_bitmask_operator_masks_what_the_torch_ops_mask(vocab):
    """One pass in C++ against the torch formulation: bits 0 forbid, tokens past the mask's words are
    forbidden, rows outside ``index`` are untouched."""
    from llama_lab import kernels

    assert kernels.load() is None
    torch.manual_seed(vocab)
    logits = torch.randn(6, vocab)
    words = max(1, (vocab - 5) // 32)  # a grammar vocabulary a little shorter than the model's
    mask = torch.randint(-2**31, 2**31 - 1, (3, words), dtype=torch.int32)
    mask[0, 0] = -1  # a word that allows all 32 tokens
    mask[1, 0] = 0  # a word that allows none
    index = torch.tensor([4, 0, 2])
    want = sampling._apply_bitmask_torch(logits.clone(), mask, index)
    got = sampling.apply_bitmask(logits.clone(), mask, index)
    assert torch.equal(got, want)
    assert torch.equal(got[[1, 3, 5]], logits[[1, 3, 5]])
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.llama_lab.apply_token_bitmask_(logits.clone(), mask, torch.tensor([0, 1, 6]))
