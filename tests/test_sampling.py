"""Incremental detokenization, stop strings and per-row sampling."""

from __future__ import annotations

import pytest
import torch

from llama_lab.engine.detokenizer import Detokenizer
from llama_lab.engine.sampling import SamplingParams, apply_penalties, sample_row

CHINESE = "1+1等于几？答案是二。我们再来看看“中文字符”被拆成多个字节的情况：龘、𠮷、😀。"


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


def test_sample_row_respects_top_k_and_seed():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0, 1.0])
    p = SamplingParams(temperature=1.0, top_k=2, seed=3)
    draws = {sample_row(logits.clone(), p, torch.Generator().manual_seed(i)) for i in range(50)}
    assert draws <= {1, 2} and len(draws) == 2
    g1, g2 = torch.Generator().manual_seed(42), torch.Generator().manual_seed(42)
    p2 = SamplingParams(temperature=1.5)
    assert [sample_row(logits, p2, g1) for _ in range(20)] == [sample_row(logits, p2, g2) for _ in range(20)]


def test_top_p_keeps_the_crossing_token():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = SamplingParams(temperature=1.0, top_p=0.7)
    draws = {sample_row(logits, p, torch.Generator().manual_seed(i)) for i in range(200)}
    assert draws == {0, 1}


def test_penalties_follow_openai_and_hf_definitions():
    logits = torch.tensor([2.0, -2.0, 1.0])
    counts = torch.tensor([3.0, 0.0, 1.0])
    out = apply_penalties(logits.clone(), torch.tensor([0, 1]), counts,
                          SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.1))
    # HF: positive logits divided, negative multiplied; OpenAI: -= presence*[c>0] + frequency*c
    assert out.tolist() == pytest.approx([2.0 / 2 - 0.5 - 0.3, -2.0 * 2, 1.0 - 0.5 - 0.1])


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1),
                                 dict(repetition_penalty=0), dict(top_logprobs=21)])
def test_invalid_params_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
