"""Real clients, unchanged: the openai SDK (sync, async, 16 at once), the old demo's curl and
requests snippets, and a NextChat-shaped stream, against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import subprocess
import unicodedata

import httpx
import openai
import pytest
import requests

HI = [{"role": "user", "content": "hi"}]
OLD_DEMO_BODY = '{"model":"llama-3-chinese","messages":[{"role":"user","content":"1+1等于几?"}],"max_tokens":4096}'


def sync_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="anything", max_retries=0, timeout=120)


def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="anything", max_retries=0, timeout=300)


# ---------------------------------------------------------------- openai SDK


def test_openai_sync_chat_stream_and_not(tiny_server, tiny_model):
    client = sync_client(tiny_server)
    assert [m.id for m in client.models.list()] == [tiny_model.name]
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=4, seed=8, temperature=1)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=4, seed=8, temperature=1,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 4
    text = client.completions.create(model="x", prompt="Once upon", max_tokens=3)
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 3
    emb = client.embeddings.create(model="x", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == tiny_model.model.config.hidden_size


def test_openai_sdk_raises_its_own_errors(tiny_server, tiny_model):
    client = sync_client(tiny_server)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi " * 3000}])
    assert info.value.code == "context_length_exceeded"
    assert "maximum context length" in info.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="x", messages=HI, n=0)


def test_openai_async_chat_stream_and_not(tiny_server):
    async def main():
        client = async_client(tiny_server)
        reply = await client.chat.completions.create(model="m", messages=HI, max_tokens=3)
        stream = await client.chat.completions.create(model="m", messages=HI, max_tokens=3, stream=True)
        chunks = [c async for c in stream]
        await client.close()
        return reply, chunks

    reply, chunks = asyncio.run(main())
    assert reply.choices[0].finish_reason == "length"
    assert chunks[-1].choices[0].finish_reason == "length" and len({c.id for c in chunks}) == 1


def test_sixteen_concurrent_async_streams_all_complete(tiny_server):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[list[dict], list[str]]:
        async with client.chat.completions.with_streaming_response.create(
                model="m", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=6, stream=True,
                stream_options={"include_usage": True}) as response:
            lines = [line async for line in response.iter_lines() if line.startswith("data: ")]
        return [json.loads(line[6:]) for line in lines if line != "data: [DONE]"], lines

    async def main():
        client = async_client(tiny_server)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(16)))
        finally:
            await client.close()

    results = asyncio.run(main())
    ids = set()
    for chunks, lines in results:
        assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
        assert len({c["id"] for c in chunks}) == 1
        ids.add(chunks[0]["id"])
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 6
    assert len(ids) == 16


def _seeded_alone_and_in_a_crowd(server, body: dict, crowd: int = 8) -> tuple[str, str]:
    async def main():
        client = async_client(server)
        try:
            alone = await client.chat.completions.create(**body)
            others = [client.chat.completions.create(model="m", max_tokens=body["max_tokens"], temperature=1.0,
                                                     messages=[{"role": "user", "content": "other " * (i * 5 + 1)}])
                      for i in range(crowd)]
            together = await asyncio.gather(*others[: crowd // 2], client.chat.completions.create(**body),
                                            *others[crowd // 2:])
            return alone.choices[0].message.content, together[crowd // 2].choices[0].message.content
        finally:
            await client.close()

    return asyncio.run(main())


def test_per_request_seed_is_unaffected_by_concurrent_requests(tiny_server):
    body = dict(model="m", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=10,
                temperature=1.0, seed=1234)
    alone, crowded = _seeded_alone_and_in_a_crowd(tiny_server, body)
    assert crowded == alone


@pytest.mark.slow
def test_per_request_seed_among_concurrent_requests_on_the_embedded_model(default_server):
    """Each request has its own generator, so the sampled tokens only depend on the logits. In bf16
    a row's logits shift slightly with the batch it is decoded in (other matmul shapes), which can
    flip a near-tie a few tokens in (seen: identical for 3 words, then 'delicate' vs 'wonderful').
    So the embedded model is compared on a short prefix; the tiny-model test above (same engine,
    near-flat random logits) checks the full text."""
    body = dict(model="m", messages=[{"role": "user", "content": "Tell me a short story about a cat."}],
                max_tokens=8, temperature=0.9, seed=1234)
    alone, crowded = _seeded_alone_and_in_a_crowd(default_server, body)
    assert alone.split()[:2] == crowded.split()[:2], (alone, crowded)


# ---------------------------------------------------------------- the seed's clients, on the embedded model


@pytest.fixture(scope="module")
def greedy_default_server(default_server):
    """A second server on the same engine whose default temperature is 0. The snippets send no
    temperature and no seed; at the default 0.7 this 135M model loops to the 4096 cap in about 1 reply
    of 8 (measured: 4 of 30), which says nothing about the stop ids. Greedy makes the check exact."""
    from llama_lab import serve

    with serve(default_server.engine, port=0, log_level="warning", default_temperature=0) as server:
        yield server


@pytest.mark.slow
def test_old_demo_curl_and_requests_snippets_verbatim(greedy_default_server):
    """The write-up's curl command and requests snippet; the model must end its answer itself."""
    port = greedy_default_server.port
    curl = subprocess.Popen(
        ["curl", "-sS", "--max-time", "280", f"http://127.0.0.1:{port}/v1/chat/completions",
         "-H", "Content-Type: application/json", "-H", "Authorization: Bearer x", "-d", OLD_DEMO_BODY],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer x"}
    data = {"model": "llama-3-chinese", "messages": [{"role": "user", "content": "1+1等于几?"}], "max_tokens": 4096}
    response = requests.post(url, headers=headers, data=json.dumps(data))

    out, err = curl.communicate(timeout=300)
    assert curl.returncode == 0, err
    for body in (json.loads(out), response.json()):
        choice = body["choices"][0]
        assert choice["finish_reason"] == "stop"  # the model's own end-of-turn token, not the 4096 cap
        assert body["usage"]["completion_tokens"] < 1000
        assert choice["message"]["content"].strip()
        assert "\ufffd" not in choice["message"]["content"]
        assert choice["message"]["content"] != data["messages"][0]["content"]  # the old demo echoed it
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"


@pytest.mark.slow
def test_nextchat_shaped_stream(default_server):
    headers = {"accept": "text/event-stream", "Content-Type": "application/json", "Authorization": "Bearer sk-anything"}
    body = {"messages": [{"role": "system", "content": "You are ChatGPT, a large language model trained by OpenAI."},
                         {"role": "user", "content": "Say hello in one short sentence."}],
            "stream": True, "model": "gpt-4o-mini", "temperature": 0.5, "presence_penalty": 0,
            "frequency_penalty": 0, "top_p": 1, "max_tokens": 24}
    with httpx.stream("POST", default_server.url + "/v1/chat/completions", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    content = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or "" for line in lines[:-1])
    assert content.strip()


@pytest.mark.slow
def test_chinese_text_is_intact_in_streams(default_server):
    """Chinese characters span several byte-level tokens; no chunk may carry a half character."""
    body = {"messages": [{"role": "user", "content": "请用中文回答：今天天气怎么样？"}], "max_tokens": 16, "temperature": 0}
    with httpx.stream("POST", default_server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        raw = r.read().decode("utf-8")
    pieces = [json.loads(e[6:])["choices"][0]["delta"].get("content") or ""
              for e in raw.splitlines() if e.startswith("data: {")]
    streamed = "".join(pieces)
    assert not any("\ufffd" in p for p in pieces), pieces
    assert any(unicodedata.name(ch, "").startswith("CJK UNIFIED") for ch in streamed), streamed
    whole = httpx.post(default_server.url + "/v1/chat/completions", json=body, timeout=120).json()
    assert whole["choices"][0]["message"]["content"] == streamed
