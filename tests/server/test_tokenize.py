"""``POST /tokenize`` counts a request's prompt exactly as generation does (the gateway's quota relies on it)."""

from __future__ import annotations

import pytest

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "1+1等于几?🙂"},
     {"role": "assistant", "content": "2"}, {"role": "user", "content": "why?"}],
    [{"role": "user", "content": [{"type": "text", "text": "parts, "}, {"type": "text", "text": "joined"}]}],
]


@pytest.mark.parametrize("messages", CHATS, ids=range(len(CHATS)))
@pytest.mark.parametrize("tools", [None, [WEATHER]], ids=["no-tools", "tools"])
def test_chat_count_is_the_usage_of_the_same_request(http, messages, tools):
    body = {"messages": messages, "max_tokens": 1, "temperature": 0, **({"tools": tools} if tools else {})}
    counted = http.post("/tokenize", json=body)
    assert counted.status_code == 200, counted.text
    answer = http.post("/v1/chat/completions", json=body).json()
    data = counted.json()
    assert data["count"] == answer["usage"]["prompt_tokens"] == len(data["tokens"])
    assert data["max_model_len"] > data["count"]


def test_tools_are_counted_and_tool_choice_none_leaves_them_out(http):
    plain = http.post("/tokenize", json={"messages": CHATS[0]}).json()["count"]
    with_tools = http.post("/tokenize", json={"messages": CHATS[0], "tools": [WEATHER]}).json()["count"]
    hidden = http.post("/tokenize", json={"messages": CHATS[0], "tools": [WEATHER], "tool_choice": "none"}).json()["count"]
    assert with_tools > plain == hidden


@pytest.mark.parametrize("prompt", ["Once upon a time", [101, 102, 103]], ids=["text", "ids"])
def test_prompt_count_is_the_usage_of_a_completion(http, prompt):
    counted = http.post("/tokenize", json={"prompt": prompt}).json()["count"]
    answer = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}).json()
    assert counted == answer["usage"]["prompt_tokens"]


@pytest.mark.parametrize("body, param", [
    ({}, None),
    ({"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}, None),
    ({"prompt": ""}, None),
    ({"messages": []}, "messages"),
    ({"prompt": [10 ** 9]}, "prompt"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
], ids=["nothing", "both", "empty-prompt", "empty-messages", "unknown-id", "required-without-tools"])
def test_bad_bodies_are_openai_400s(http, body, param):
    r = http.post("/tokenize", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"] == param
