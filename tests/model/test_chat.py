"""Stop ids come from the tokenizer, the generation config and the chat template: no hand edits."""

from __future__ import annotations

import pytest
import torch

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture()
def llama3_tokenizer(tiny_model):
    """The real SmolLM2 tokenizer re-dressed as Llama-3: eos <|end_of_text|>, turns end with <|eot_id|>."""
    import copy

    tok = copy.deepcopy(tiny_model.tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]})
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def test_llama3_stop_ids_include_eot(llama3_tokenizer):
    from llama_lab.model.chat import resolve_stop_ids

    eot = llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    eos = llama3_tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    ids = resolve_stop_ids(llama3_tokenizer, generation_config=None)
    assert eot in ids, "the seed's endless-output bug: <|eot_id|> must stop generation"
    assert eos in ids


def test_chatml_stop_ids_and_generation_config_union(tiny_model):
    from transformers import GenerationConfig

    from llama_lab.model.chat import resolve_stop_ids

    tok = tiny_model.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = resolve_stop_ids(tok, GenerationConfig(eos_token_id=[0, 7]))
    assert {im_end, 0, 7} <= ids


def test_engine_stops_on_template_turn_end_not_tokenizer_eos(tiny_model, llama3_tokenizer):
    """A model whose only likely token is <|eot_id|> (not the tokenizer's eos) ends its turn at once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_lab.model.chat import resolve_stop_ids
    from llama_lab.engine import Engine, SamplingParams
    from llama_lab.model.loading import LoadedModel

    tok = llama3_tokenizer
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tok), tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    head = torch.nn.Linear(config.hidden_size, len(tok), bias=True)
    with torch.no_grad():  # every position predicts <|eot_id|>
        head.weight.zero_()
        head.bias.zero_()
        head.bias[eot] = 10.0
    model.lm_head = head
    lm = LoadedModel(model=model, tokenizer=tok, stop_token_ids=resolve_stop_ids(tok, model.generation_config),
                     device=torch.device("cpu"), dtype=torch.float32, mode=tiny_model.mode, source="test",
                     name="llama3-eot-test", random_weights=True, load_seconds=0, weights_bytes=0,
                     rss_delta_bytes=0, device_bytes=None, context_length=256)
    with Engine(lm) as engine:
        prompt = lm.chat_prompt_ids([{"role": "user", "content": "hi"}])
        assert tok.decode(prompt).startswith("<|begin_of_text|><|start_header_id|>user")
        out = engine.generate(prompt, SamplingParams(max_tokens=200, temperature=0))
    assert out.finish_reason == "stop"
    assert out.completion_tokens == 0 and out.text == ""


def test_content_parts_are_flattened():
    from llama_lab.model.chat import message_text

    parts = [{"type": "text", "text": "看图"}, {"type": "image_url", "image_url": {"url": "data:..."}},
             {"type": "text", "text": "说话"}]
    assert message_text(parts) == "看图说话"
    assert message_text(None) == ""
