"""Structured outputs and tool calling, driven by the openai SDK against real servers.

Most tests run on the random tiny model: its output is noise, so an answer that parses and
validates proves the grammar did it. The embedded SmolLM2 tests (``slow``) show the same contract
with a model that writes sensible JSON.
"""

from __future__ import annotations

import json
import queue
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from helpers.engine import cancel_after_tokens, steps_after_cancel

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "status": {"type": "string", "enum": ["active", "inactive", "pending"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "status", "tags", "address"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def client(tiny_server):
    with openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def _json_schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# ---------------------------------------------------------------- response_format


def test_json_schema_output_validates_for_20_seeds_even_with_random_weights(client):
    def one(seed: int) -> tuple[str, str | None]:
        r = client.chat.completions.create(model="tiny", messages=ASK, seed=seed, temperature=1.0, max_tokens=400,
                                           response_format=_json_schema_format(NESTED))
        return r.choices[0].finish_reason, r.choices[0].message.content

    with ThreadPoolExecutor(10) as pool:  # concurrent: constrained rows share decode steps
        answers = list(pool.map(one, range(20)))
    for finish, content in answers:
        assert finish == "stop", content
        jsonschema.validate(json.loads(content), NESTED)


def test_json_object_always_parses(client):
    def one(seed: int):
        return client.chat.completions.create(model="tiny", messages=ASK, seed=seed, max_tokens=150,
                                              response_format={"type": "json_object"})

    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(one, range(5)))
    for r in answers:
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
        else:  # cut by max_tokens: the only way out of the grammar, and it says so
            assert r.choices[0].finish_reason == "length"


def test_sdk_parse_returns_a_pydantic_object(client):
    class Step(BaseModel):  # bounded, so that random weights finish within max_tokens
        explanation: str = Field(max_length=10)
        done: bool

    class Plan(BaseModel):
        title: str = Field(max_length=10)
        steps: list[Step] = Field(max_length=2)

    r = client.chat.completions.parse(model="tiny", messages=ASK, response_format=Plan, seed=3, max_tokens=300)
    assert isinstance(r.choices[0].message.parsed, Plan)


def test_streamed_json_schema_is_the_same_answer(client):
    kwargs = dict(model="tiny", messages=ASK, seed=11, max_tokens=400, response_format=_json_schema_format(NESTED))
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(streamed), NESTED)


def test_text_format_and_empty_tools_are_free_text(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=3, response_format={"type": "text"},
                                       tools=[], temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].message.tool_calls is None


# ---------------------------------------------------------------- tools


def test_required_tool_call_non_streamed(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required",
                                       parallel_tool_calls=False, seed=1, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_named_tool_choice_always_calls_that_function(client):
    for seed in range(4):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME], seed=seed, max_tokens=200,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and calls
        for call in calls:
            assert call.function.name == "get_time"
            jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])


def test_streamed_tool_call_deltas_are_assembled_by_the_sdk(client):
    kwargs = dict(model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", seed=5, max_tokens=300)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    first = next(c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls)
    assert first.id and first.function.name and first.function.arguments == ""  # id and name come first
    with client.chat.completions.stream(**kwargs) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    whole = client.chat.completions.create(**kwargs)
    streamed_calls, calls = final.choices[0].message.tool_calls, whole.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == whole.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed_calls] == \
           [(c.function.name, c.function.arguments) for c in calls]
    for call in streamed_calls:
        json.loads(call.function.arguments)


def test_two_step_tool_loop_renders_the_call_and_its_result(client):
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, seed=2, max_tokens=200)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    for stream in (False, True):
        r = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=5, stream=stream)
        if stream:
            assert [c for c in r if c.choices and c.choices[0].finish_reason]
        else:
            assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_legacy_functions_answer_with_function_call(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, functions=[WEATHER["function"]],
                                       function_call={"name": "get_weather"}, seed=4, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_weather"
    json.loads(choice.message.function_call.arguments)


# ---------------------------------------------------------------- bad input: 400 naming the field


@pytest.mark.parametrize("body, param", [
    ({"response_format": _json_schema_format({"type": "no-such-type"})}, "response_format"),
    ({"response_format": _json_schema_format({"$ref": "#/definitions/missing"})}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"logit_bias": {"999999": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
])
def test_bad_structured_input_is_a_400_naming_the_field(http, body, param):
    r = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_non_json_arguments_in_the_history_are_a_400(http):
    messages = ASK + [{"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21"}]
    r = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages.1.tool_calls.0.function.arguments"


# ---------------------------------------------------------------- the batch


def test_free_rows_are_unchanged_beside_constrained_rows(client):
    free = dict(model="tiny", messages=ASK, temperature=0, max_tokens=24)
    alone = client.chat.completions.create(**free).choices[0].message.content
    with ThreadPoolExecutor(8) as pool:
        constrained = [pool.submit(client.chat.completions.create, model="tiny", messages=ASK, seed=s, max_tokens=200,
                                   response_format=_json_schema_format(NESTED)) for s in range(4)]
        mixed = [pool.submit(client.chat.completions.create, **free) for _ in range(4)]
        for f in constrained:
            json.loads(f.result().choices[0].message.content)
        assert {f.result().choices[0].message.content for f in mixed} == {alone}


def test_logit_bias_forces_and_forbids_tokens(client, tiny_model):
    token = tiny_model.tokenizer.encode(" cat")[0]
    forced = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=4,
                                            logit_bias={str(token): 100})
    assert forced.choices[0].message.content == " cat" * 4
    plain = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=1, logprobs=True)
    first = plain.choices[0].logprobs.content[0].token
    first_id = tiny_model.tokenizer.encode(first)[0]
    banned = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=1,
                                            logit_bias={str(first_id): -100})
    assert banned.choices[0].message.content != first


def test_cancel_lands_within_one_step_for_a_constrained_request(tiny_engine, tiny_model):
    from llama_lab.engine import SamplingParams
    from llama_lab.engine.grammar import GrammarCompiler, GrammarSpec

    grammar = GrammarCompiler(tiny_model.tokenizer, tiny_model.stop_token_ids).compile(
        GrammarSpec.json_schema({"type": "array", "items": {"type": "integer"}}))
    prompt = tiny_model.tokenizer.encode("numbers:")
    delta, handle = cancel_after_tokens(tiny_engine, prompt, SamplingParams(max_tokens=500, grammar=grammar, seed=1))
    assert delta.finish_reason == "cancelled" and steps_after_cancel(handle) <= 1


def test_grammar_cache_compiles_a_schema_once(tiny_model):
    from llama_lab.engine.grammar import GrammarCompiler, GrammarError, GrammarSpec

    compiler = GrammarCompiler(tiny_model.tokenizer, tiny_model.stop_token_ids)
    a = compiler.compile(GrammarSpec.json_schema(NESTED))
    assert compiler.compile(GrammarSpec.json_schema(json.loads(json.dumps(NESTED)))) is a
    assert a.matcher() is not a.matcher()
    with pytest.raises(GrammarError, match="foo"):
        compiler.compile(GrammarSpec.json_schema({"type": "foo"}))


# ---------------------------------------------------------------- templates and the parser


def test_tool_formats_follow_the_template():
    from llama_lab.model.chat import tool_format

    class Tok:
        def __init__(self, template):
            self.chat_template = template

    assert tool_format(Tok("{{ messages }}")).name == "generic"
    assert tool_format(Tok("{% if tools %}<tool_call>{% endif %}")).name == "hermes"
    assert tool_format(Tok("{% if tools %}<|python_tag|>{% endif %}")).name == "llama3_json"


def test_generic_prompt_renders_calls_and_results_for_smollm2(tiny_model):
    from llama_lab.model.chat import render_tool_chat

    messages = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C"}]
    text = render_tool_chat(tiny_model.tokenizer, messages, [WEATHER])
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n21 C\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_parser_gives_the_same_calls_whatever_the_delta_sizes(size):
    from llama_lab.model.chat import TOOL_FORMATS
    from llama_lab.server.tools import ToolCallParser

    text = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par}is"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    parser = ToolCallParser(TOOL_FORMATS["generic"])
    events = [e for i in range(0, len(text), size) for e in parser.feed(text[i:i + size])] + parser.finish()
    content = "".join(e.text for e in events if e.kind == "content")
    names = [e.name for e in events if e.kind == "start"]
    args = ["".join(e.text for e in events if e.kind == "arguments" and e.index == i) for i in range(2)]
    assert content == "Let me check." and names == ["get_weather", "get_time"]
    assert [json.loads(a) for a in args] == [{"city": "Par}is"}, {}]


def test_gateway_quota_bound_covers_a_tool_prompt(client):
    from llama_lab.gateway.quota import prompt_upper_bound

    body = {"messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "auto"}
    r = client.chat.completions.create(model="tiny", max_tokens=1, **body)
    assert r.usage.prompt_tokens <= prompt_upper_bound(body)


def test_sampling_defaults_are_declared_once():
    from llama_lab.defaults import DEFAULTS
    from llama_lab.engine import SamplingParams
    from llama_lab.server.protocol import Defaults
    from llama_lab.server.settings import ServerSettings

    settings, params, protocol = ServerSettings(), SamplingParams(), Defaults()
    assert (settings.default_max_tokens, settings.default_temperature, settings.default_top_p) == \
           (params.max_tokens, params.temperature, params.top_p) == \
           (protocol.max_tokens, protocol.temperature, protocol.top_p) == \
           (DEFAULTS.max_tokens, DEFAULTS.temperature, DEFAULTS.top_p)


# ---------------------------------------------------------------- the embedded model


@pytest.fixture
def smol(default_server):
    with openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.mark.slow
def test_embedded_model_sdk_parse(smol):
    class City(BaseModel):  # bounded: a 135M model at temperature 0 may repeat itself inside a string
        name: str = Field(max_length=24)
        country: str = Field(max_length=24)
        population_millions: int = Field(ge=0, le=10000)

    r = smol.chat.completions.parse(model="smol", messages=[{"role": "user", "content": "Describe Paris as JSON."}],
                                    response_format=City, temperature=0, max_tokens=200)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(r.choices[0].message.parsed, City)


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_embedded_model_two_step_weather_loop(smol, stream):
    messages = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    # one call: with parallel calls allowed, greedy SmolLM2 repeats the same call until max_tokens
    kwargs = dict(model="smol", tools=[WEATHER], temperature=0, max_tokens=120, parallel_tool_calls=False)
    if stream:
        with smol.chat.completions.stream(messages=messages, tool_choice="required", **kwargs) as s:
            for _ in s:
                pass
            first = s.get_final_completion()
    else:
        first = smol.chat.completions.create(messages=messages, tool_choice="required", **kwargs)
    assert first.choices[0].finish_reason == "tool_calls"
    (call,) = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"]
    messages += [{"role": "assistant", "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_celsius": 21})}]
    answer = smol.chat.completions.create(messages=messages, tool_choice="none", **kwargs)
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content.strip()
