"""The OpenAI-compatible app over a real uvicorn server on the tiny random model, driven by httpx."""

from __future__ import annotations

import base64
import json
import math
import re
import struct

import httpx
import pytest
from helpers.engine import wait_idle, wait_until

from llama_lab import serve

HI = [{"role": "user", "content": "hi"}]


def chat(http: httpx.Client, **body):
    return http.post("/v1/chat/completions", json={"messages": HI, **body})


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def stream_chunks(http: httpx.Client, path: str = "/v1/chat/completions", **body) -> tuple[list[dict], list[str]]:
    with http.stream("POST", path, json={"stream": True, **body}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]], events


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


# ---------------------------------------------------------------- info routes


def test_health_and_models_report_the_served_model(http, tiny_model):
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == tiny_model.name
    # the process's RSS, and what it grew by since just before the model's load (in a test process other
    # models come and go, so the growth may be negative here: the baseline is what is checked)
    memory = health["memory"]
    assert memory["rss_mb"] > 0 and memory["weights_mb"] == round(tiny_model.weights_bytes / 2**20, 1)
    assert memory["rss_mb"] - memory["model_adds_mb"] == pytest.approx(tiny_model.rss_before_bytes / 2**20, abs=0.2)
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [tiny_model.name]
    assert models["data"][0]["object"] == "model"


def test_model_name_setting_serves_those_names_and_any_name_is_accepted(tiny_engine):
    with serve(tiny_engine, port=0, model_name="llama-3-chinese,gpt-4o-mini") as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["llama-3-chinese", "gpt-4o-mini"]
        r = chat(http, model="gpt-4o-mini", max_tokens=2)
        assert r.status_code == 200 and r.json()["model"] == "gpt-4o-mini"
        r = chat(http, model="some-name-nobody-serves", max_tokens=2)
        assert r.status_code == 200 and r.json()["model"] == "llama-3-chinese"


def test_unknown_path_and_method_are_openai_shaped(http):
    assert "unknown path" in assert_openai_error(http.get("/v1/nope"), 404)["message"]
    assert_openai_error(http.put("/v1/models"), 405)


# ---------------------------------------------------------------- chat completions


def test_chat_completion_shape_usage_and_length_finish(http):
    r = chat(http, max_tokens=5)
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] == "length"  # random weights never emit the stop token in 5 steps
    usage = body["usage"]
    assert usage["completion_tokens"] == 5 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5


def test_max_completion_tokens_is_honoured_and_wins_over_max_tokens(http):
    assert chat(http, max_completion_tokens=3).json()["usage"]["completion_tokens"] == 3
    assert chat(http, max_tokens=7, max_completion_tokens=2).json()["usage"]["completion_tokens"] == 2


def test_content_part_lists_and_images_are_accepted(http):
    parts = [{"type": "text", "text": "what is "}, {"type": "text", "text": "this?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    as_parts = chat(http, messages=[{"role": "user", "content": parts}], max_tokens=4, seed=3)
    as_text = chat(http, messages=[{"role": "user", "content": "what is this?"}], max_tokens=4, seed=3)
    assert as_parts.status_code == as_text.status_code == 200
    # the image is dropped and the text parts joined: the model saw the same prompt (the second request may take
    # its leading blocks from the prefix cache, which only the same tokens match)
    parts_usage, text_usage = as_parts.json()["usage"], as_text.json()["usage"]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert parts_usage[key] == text_usage[key], key
    assert text_usage["prompt_tokens_details"]["cached_tokens"] >= parts_usage["prompt_tokens_details"]["cached_tokens"]
    assert as_parts.json()["choices"][0]["message"] == as_text.json()["choices"][0]["message"]


def test_stream_has_one_id_role_first_finish_last_and_done(http):
    chunks, _ = stream_chunks(http, messages=HI, max_tokens=6, seed=11, temperature=1)
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)  # only when stream_options.include_usage asks
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    whole = chat(http, max_tokens=6, seed=11, temperature=1).json()["choices"][0]["message"]["content"]
    assert streamed == whole  # the JSON answer is the stream, collected


def test_usage_counts_the_prompt_tokens_the_prefix_cache_held(http):
    """The second turn of a conversation resends the first: OpenAI's ``cached_tokens`` says how much was reused."""
    history = [{"role": "system", "content": "You answer questions about test_usage_counts_cached. " * 12},
               {"role": "user", "content": "Name a colour."}]
    first = chat(http, messages=history, max_tokens=3, temperature=0).json()["usage"]
    # the server is shared: an earlier test's prompt may have left the chat template's first tokens in the cache
    # (a prompt takes the tokens it shares with a cached block's start), never more than the words before this
    # test's own name
    assert first["prompt_tokens"] > 128 and set(first["prompt_tokens_details"]) == {"cached_tokens"}
    assert first["prompt_tokens_details"]["cached_tokens"] < 16
    chunks, _ = stream_chunks(http, messages=history + [{"role": "assistant", "content": "Blue."},
                                                        {"role": "user", "content": "Another?"}],
                              max_tokens=3, temperature=0, stream_options={"include_usage": True})
    usage = chunks[-1]["usage"]
    assert 128 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]


def test_stream_include_usage_sends_a_final_usage_chunk(http):
    chunks, _ = stream_chunks(http, messages=HI, max_tokens=4, stream_options={"include_usage": True})
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 4
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 4


def test_same_seed_same_text_and_other_seed_other_text(http):
    def text(seed):
        return chat(http, max_tokens=8, temperature=1.0, seed=seed).json()["choices"][0]["message"]["content"]

    first = text(42)
    assert text(42) == first
    assert text(43) != first


def test_n_gives_n_distinct_reproducible_choices(http):
    body = chat(http, max_tokens=5, n=3, temperature=1, seed=5).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in body["choices"]]
    assert len(set(texts)) == 3
    assert body["usage"]["completion_tokens"] == 15
    again = chat(http, max_tokens=5, n=3, temperature=1, seed=5).json()
    assert [c["message"]["content"] for c in again["choices"]] == texts
    chunks, _ = stream_chunks(http, messages=HI, max_tokens=3, n=2)
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1]


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_sequence_ends_the_text_before_the_stop_and_says_stop(http, as_list):
    full = chat(http, max_tokens=16, temperature=1, seed=99).json()["choices"][0]["message"]["content"]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), f"pick another seed: {full!r}"
    expected = full[:full.index(stop)]
    r = chat(http, max_tokens=16, temperature=1, seed=99, stop=["never-in-output-zzz", stop] if as_list else stop)
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == expected
    assert choice["finish_reason"] == "stop"
    chunks, _ = stream_chunks(http, messages=HI, max_tokens=16, temperature=1, seed=99, stop=stop)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_presence_and_frequency_penalties_change_a_repetitive_greedy_output(http):
    plain = chat(http, max_tokens=12, temperature=0).json()["choices"][0]["message"]["content"]
    assert len(set(plain)) <= 2, f"the tiny model's greedy answer is expected to repeat itself: {plain!r}"
    for field in ("presence_penalty", "frequency_penalty"):
        penalized = chat(http, max_tokens=12, temperature=0, **{field: 2.0}).json()["choices"][0]["message"]["content"]
        assert len(set(penalized)) > len(set(plain)), field


def test_other_sampling_fields_user_and_unknown_fields_are_accepted(http):
    r = chat(http, max_tokens=3, temperature=0.5, top_p=0.5, top_k=20, repetition_penalty=1.3, user="alice",
             tools=[], parallel_tool_calls=False, response_format={"type": "text"}, some_future_field={"x": 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_chat_logprobs_and_top_logprobs(http):
    body = chat(http, max_tokens=4, logprobs=True, top_logprobs=3).json()
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 4
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for e in content:
        assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 3
        assert e["top_logprobs"][0]["logprob"] >= e["logprob"] - 1e-6
    assert chat(http, max_tokens=2).json()["choices"][0]["logprobs"] is None


# ---------------------------------------------------------------- completions and embeddings


def test_text_completions_strings_lists_ids_echo_and_logprobs(http, tiny_model):
    body = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 4}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 4
    two = http.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2}).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    ids = tiny_model.tokenizer.encode("Once upon a time")
    by_ids = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 4, "seed": 1, "temperature": 1}).json()
    by_text = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 4, "seed": 1, "temperature": 1}).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    echo = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 2, "echo": True}).json()
    assert echo["choices"][0]["text"].startswith("Once upon a time")
    lp = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "logprobs": 2}).json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 3 and all(len(t) <= 2 for t in lp["top_logprobs"])
    chunks, _ = stream_chunks(http, "/v1/completions", prompt="hi", max_tokens=3)
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_embeddings_float_and_base64(http, tiny_model):
    body = http.post("/v1/embeddings", json={"input": ["hello", "world"], "model": "anything"}).json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    vec = body["data"][0]["embedding"]
    assert len(vec) == tiny_model.model.config.hidden_size
    assert math.isclose(math.sqrt(sum(v * v for v in vec)), 1.0, rel_tol=1e-3)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    b64 = http.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"}).json()["data"][0]["embedding"]
    raw = base64.b64decode(b64)
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert decoded == pytest.approx(vec, abs=1e-6)


# ---------------------------------------------------------------- metrics


def _metric(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape(labels)}\s+([0-9.e+-]+)$" if labels else rf"^{re.escape(name)}\s+([0-9.e+-]+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def test_metrics_count_requests_tokens_in_flight_queue_and_ttft(http):
    before = http.get("/metrics").text
    assert chat(http, max_tokens=5).status_code == 200
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = r.text
    label = '{path="/v1/chat/completions",status="200"}'
    done_before = _metric(before, "llama_lab_requests_total", label) if label in before else 0
    assert _metric(after, "llama_lab_requests_total", label) == done_before + 1
    assert _metric(after, "llama_lab_completion_tokens_total") - _metric(before, "llama_lab_completion_tokens_total") == 5
    assert _metric(after, "llama_lab_prompt_tokens_total") > _metric(before, "llama_lab_prompt_tokens_total")
    assert _metric(after, "llama_lab_requests_in_flight") == 0
    assert _metric(after, "llama_lab_queue_waiting") == 0
    assert _metric(after, "llama_lab_time_to_first_token_seconds_count") >= 1


# ---------------------------------------------------------------- errors


GARBAGE = {
    "bad json": dict(content=b'{"messages": [', headers={"content-type": "application/json"}),
    "bad json, no content-type": dict(content=b'{"messages": ['),
    "empty body": dict(content=b"", headers={"content-type": "application/json"}),
    "array body": dict(json=[1, 2]),
    "null body": dict(content=b"null", headers={"content-type": "application/json"}),
    "string body": dict(json="hello"),
    "number body": dict(json=5),
    "messages is a string": dict(json={"messages": "hello"}),
    "messages empty": dict(json={"messages": []}),
    "messages missing": dict(json={"model": "x"}),
    "message is a string": dict(json={"messages": ["hi"]}),
    "unknown role": dict(json={"messages": [{"role": "wizard", "content": "hi"}]}),
    "role missing": dict(json={"messages": [{"content": "hi"}]}),
    "content is a number": dict(json={"messages": [{"role": "user", "content": 5}]}),
    "content parts are not objects": dict(json={"messages": [{"role": "user", "content": [5, "x"]}]}),
    "n=0": dict(json={"messages": HI, "n": 0}),
    "huge n": dict(json={"messages": HI, "n": 100000}),
    "n is a word": dict(json={"messages": HI, "n": "two"}),
    "negative max_tokens": dict(json={"messages": HI, "max_tokens": -1}),
    "max_tokens=0": dict(json={"messages": HI, "max_tokens": 0}),
    "fractional max_tokens": dict(json={"messages": HI, "max_tokens": 1.5}),
    "astronomical max_tokens": dict(json={"messages": HI, "max_tokens": 2**70}),
    "max_completion_tokens=0": dict(json={"messages": HI, "max_completion_tokens": 0}),
    "temperature is a word": dict(json={"messages": HI, "temperature": "hot"}),
    "temperature NaN": dict(content=b'{"messages":[{"role":"user","content":"hi"}],"temperature":NaN}',
                            headers={"content-type": "application/json"}),
    "top_p=0": dict(json={"messages": HI, "top_p": 0}),
    "negative top_k": dict(json={"messages": HI, "top_k": -1}),
    "presence_penalty 5": dict(json={"messages": HI, "presence_penalty": 5}),
    "seed beyond 64 bits": dict(json={"messages": HI, "seed": 2**80}),
    "stop is a number": dict(json={"messages": HI, "stop": 5}),
    "too many stops": dict(json={"messages": HI, "stop": ["a"] * 20}),
    "stream_options not an object": dict(json={"messages": HI, "stream": True, "stream_options": 5}),
    "top_logprobs 99": dict(json={"messages": HI, "logprobs": True, "top_logprobs": 99}),
    "top_logprobs without logprobs": dict(json={"messages": HI, "top_logprobs": 2}),
    "model is a number": dict(json={"messages": HI, "model": 5}),
    # strict types: OpenAI answers 400 where a lax parser would coerce
    "stream is a word": dict(json={"messages": HI, "stream": "yes"}),
    "stream is 1": dict(json={"messages": HI, "stream": 1}),
    "max_tokens is a numeric string": dict(json={"messages": HI, "max_tokens": "10"}),
    "max_tokens is 2.0": dict(json={"messages": HI, "max_tokens": 2.0}),
    "n is a numeric string": dict(json={"messages": HI, "n": "2"}),
    "n is true": dict(json={"messages": HI, "n": True}),
    "temperature is a numeric string": dict(json={"messages": HI, "temperature": "0.5"}),
    "top_p is true": dict(json={"messages": HI, "top_p": True}),
    "seed is a numeric string": dict(json={"messages": HI, "seed": "5"}),
    "logprobs is a string": dict(json={"messages": HI, "logprobs": "true"}),
    "include_usage is a word": dict(json={"messages": HI, "stream": True, "stream_options": {"include_usage": "yes"}}),
    "stop list holds a number": dict(json={"messages": HI, "stop": ["a", 5]}),
    "user message without content": dict(json={"messages": [{"role": "user"}]}),
    "user content null": dict(json={"messages": [{"role": "user", "content": None}]}),
    "system message without content": dict(json={"messages": [{"role": "system"}, {"role": "user", "content": "hi"}]}),
    "assistant content null without tool calls": dict(json={"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "?"}]}),
    "content part text is a number": dict(json={"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_gets_an_openai_shaped_400_not_a_500(http, case):
    err = assert_openai_error(http.post("/v1/chat/completions", **GARBAGE[case]), 400)
    assert err["type"] == "invalid_request_error"
    assert http.get("/health").status_code == 200  # same keep-alive connection still works


def test_json_body_without_a_content_type_is_accepted(http):
    """`requests.post(url, data=json.dumps(body))` without headers sends no content type."""
    r = http.post("/v1/chat/completions", content=json.dumps({"messages": HI, "max_tokens": 2}).encode())
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
    # `curl -d '{...}'` without -H says form-urlencoded: still read as JSON
    r = http.post("/v1/chat/completions", content=json.dumps({"messages": HI, "max_tokens": 2}).encode(),
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    # a real form body is not JSON: a clear 400, not a 500
    r = http.post("/v1/chat/completions", content=b"a=1&b=2", headers={"content-type": "application/x-www-form-urlencoded"})
    assert "not valid JSON" in assert_openai_error(r, 400)["message"]


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": HI, "max_tokens": "10"}, "max_tokens"),
    ({"messages": HI, "stream": "yes"}, "stream"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": HI, "stop": 5}, "stop"),
    ({"messages": HI, "max_tokens": -1}, "max_tokens"),
])
def test_validation_errors_name_the_field_as_the_client_wrote_it(http, body, param):
    err = assert_openai_error(http.post("/v1/chat/completions", json=body), 400)
    assert err["param"] == param and param in err["message"]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": [10**9]}, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [[], [1]]}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": [1, "2"]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "echo": "yes"}, "echo"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ("/v1/embeddings", {"input": ["a", 5]}, "input"),
    ("/v1/embeddings", {"input": [10**9]}, "input"),
    ("/v1/embeddings", {"input": [-3]}, "input"),
    ("/v1/embeddings", {"input": [[], [1]]}, "input"),
    ("/v1/embeddings", {"input": ""}, "input"),
])
def test_bad_prompts_and_inputs_get_400_naming_the_field(http, path, body, param):
    err = assert_openai_error(http.post(path, json={"max_tokens": 2, **body}), 400)
    assert err["param"] == param


def test_odd_but_valid_chat_requests_are_answered(http):
    odd = [
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        [{"role": "system", "content": "only a system prompt"}],
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": "weather?"},  # the one message OpenAI lets go without content
         {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
        [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": "nul \u0000 byte"}],
    ]
    for messages in odd:
        r = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
        assert r.status_code == 200, (messages, r.text)
    lone_surrogate = b'{"messages":[{"role":"user","content":"broken \\ud800 text"}],"max_tokens":2}'
    r = http.post("/v1/chat/completions", content=lone_surrogate, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    r = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, "seed": -5})
    assert r.status_code == 200
    # integers are numbers: NextChat sends "top_p": 1 and "presence_penalty": 0
    r = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, "temperature": 1, "top_p": 1,
                                                "presence_penalty": 0, "frequency_penalty": 0, "stream": False})
    assert r.status_code == 200, r.text


def test_prompt_longer_than_the_context_is_a_400_worded_like_openai(http, tiny_model):
    ctx = tiny_model.context_length
    err = assert_openai_error(chat(http, messages=[{"role": "user", "content": "hello " * (ctx + 100)}]), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert err["message"].startswith(f"This model's maximum context length is {ctx} tokens. However, your messages resulted in")
    err = assert_openai_error(chat(http, max_tokens=ctx + 10), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert re.search(rf"you requested \d+ tokens \(\d+ in the messages, {ctx + 10} in the completion\)", err["message"])
    err = assert_openai_error(http.post("/v1/embeddings", json={"input": "hello " * (ctx + 100)}), 400)
    assert err["code"] == "context_length_exceeded"


def test_api_key_is_required_when_set(tiny_engine):
    with serve(tiny_engine, port=0, api_key="sk-right") as server, httpx.Client(base_url=server.url, timeout=60) as http:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-right"},
                        {"Authorization": "Bearer sk-right-but-longer"}):
            err = assert_openai_error(http.post("/v1/chat/completions", json={"messages": HI}, headers=headers), 401)
            assert err["code"] == "invalid_api_key"
            assert_openai_error(http.get("/v1/models", headers=headers), 401)
        ok = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2},
                       headers={"Authorization": "Bearer sk-right"})
        assert ok.status_code == 200
        assert http.get("/health").status_code == 200  # health checks need no key


def test_full_queue_gets_429_with_retry_after_and_recovers(tiny_model):
    with serve(tiny_model, port=0, max_concurrency=1) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json={"messages": HI, "stream": True, "max_tokens": 1500}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # keep it: a discarded iterator closes the response (a disconnect)
            next(lines)  # the first request holds the only slot
            busy = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2})
            err = assert_openai_error(busy, 429)
            assert err["type"] == "rate_limit_error" and "busy" in err["message"]
            assert busy.headers["retry-after"] == "1"
        wait_idle(server.engine)
        wait_until(lambda: chat(http, max_tokens=2).status_code == 200, timeout=10, interval=0.1)


# ---------------------------------------------------------------- CORS


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}


def test_cors_preflight_from_a_local_web_client_is_allowed(http):
    r = http.options("/v1/chat/completions", headers={"Origin": "http://localhost:3000", **PREFLIGHT})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    allowed = r.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert "POST" in r.headers["access-control-allow-methods"]
    real = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1}, headers={"Origin": "http://localhost:3000"})
    assert real.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_cors_foreign_origin_is_refused_by_default(http):
    r = http.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **PREFLIGHT})
    assert r.status_code != 200
    assert "access-control-allow-origin" not in r.headers
    real = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1}, headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in real.headers


def test_cors_star_allows_every_origin(tiny_engine):
    with serve(tiny_engine, port=0, cors_origins="*") as server, httpx.Client(base_url=server.url) as http:
        r = http.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **PREFLIGHT})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] in ("*", "http://evil.example")


# ---------------------------------------------------------------- NextChat's usage panel


def test_billing_routes_answer_nextchat_with_the_servers_own_token_counts(tiny_engine):
    dates = {"start_date": "2026-11-01", "end_date": "2026-12-01"}  # what NextChat sends
    with serve(tiny_engine, port=0, tokens_per_usd=1000) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        for prefix in ("", "/v1"):  # NextChat's base URL may be given with or without /v1
            sub = http.get(prefix + "/dashboard/billing/subscription")
            assert sub.status_code == 200
            assert sub.json()["hard_limit_usd"] >= 1e6  # no limit: NextChat shows it as is
            usage = http.get(prefix + "/dashboard/billing/usage", params=dates)
            assert usage.status_code == 200 and usage.json()["total_usage"] == 0
        served = chat(http, max_tokens=3).json()["usage"]["total_tokens"]
        streamed, _ = stream_chunks(http, messages=HI, max_tokens=2, stream_options={"include_usage": True})
        served += streamed[-1]["usage"]["total_tokens"]
        cents = http.get("/dashboard/billing/usage", params=dates).json()["total_usage"]
        assert cents == pytest.approx(served / 1000 * 100)  # NextChat divides by 100 to show dollars
        err = assert_openai_error(http.get("/dashboard/billing/usage", params={"start_date": "last week"}), 400)
        assert err["param"] == "start_date"


def test_billing_routes_need_the_api_key_when_one_is_set(tiny_engine):
    with serve(tiny_engine, port=0, api_key="sk-right") as server, httpx.Client(base_url=server.url, timeout=60) as http:
        for path in ("/dashboard/billing/subscription", "/dashboard/billing/usage"):
            assert assert_openai_error(http.get(path), 401)["code"] == "invalid_api_key"
            assert http.get(path, headers={"Authorization": "Bearer sk-right"}).status_code == 200
