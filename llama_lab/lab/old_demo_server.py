"""THE BUGGY PATTERN, reproduced on purpose: the old demo's streaming, with the user's attempted stop fix.

Do not copy this code. It exists so the stop experiment (``llama_lab.lab.stop_experiment``) can measure
the stop-button bug beside llama_lab's server: pressing stop in the client closes the stream, yet the
server keeps generating to ``max_tokens`` at full power.

What it reproduces from Chinese-LLaMA-Alpaca-3's ``openai_api_server.py`` and the write-up:

* ``model.generate`` runs in a ``Thread`` and feeds a ``TextIteratorStreamer``;
* an ``async`` generator loops ``for text in streamer`` -- a blocking call inside ``async def``,
  so the event loop is frozen between tokens;
* the only stop signal is a ``StoppingCriteria`` flag set in ``except asyncio.CancelledError``.
  That branch is never reached: the response task is cancelled while the generator is suspended
  at ``yield``, and an abandoned generator is closed with ``GeneratorExit``, not ``CancelledError``.

Measured effect: since ``send`` rarely suspends, the blocked loop never even reads the disconnect;
the generator runs to ``max_tokens`` and the event loop (``/health``, other clients) is frozen
for the whole answer.

Added for the measurement only (not in the original): ``GET /health``, ``GET /metrics`` with an
``old_demo_generated_tokens`` counter, ``GET /token_times`` (a ``time.monotonic()`` stamp per
generated token: the frozen loop cannot answer ``/metrics`` at the moment the client leaves, so
the benchmark counts afterwards), a log line if the stop flag is ever set, and loading
through ``llama_lab.load_model`` so both servers run the same weights. The original served with
``sse_starlette.EventSourceResponse``; starlette's ``StreamingResponse`` handles a disconnect
the same way (a task group cancels the sending task), and needs no extra dependency.

    python -m llama_lab.lab.old_demo_server --model default --port 19330
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import uuid
from threading import Thread

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from llama_lab import load_model

logger = logging.getLogger("old_demo")
COUNTER = "old_demo_generated_tokens"


class StopOnFlag(StoppingCriteria):
    """The user's fix: stop when ``flag`` is set. Also counts generated tokens (instrumentation)."""

    def __init__(self, times: list[float]) -> None:
        self.flag = False
        self.times = times

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.times.append(time.monotonic())  # called once per generated token
        return torch.full((input_ids.shape[0],), self.flag, dtype=torch.bool, device=input_ids.device)


def chunk(rid: str, delta: dict, finish: str | None = None) -> str:
    payload = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": "old-demo",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(lm) -> FastAPI:
    app = FastAPI()
    times: list[float] = []

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(f"# TYPE {COUNTER} counter\n{COUNTER} {len(times)}\n")

    @app.get("/token_times")
    async def token_times() -> dict:
        return {"clock": "time.monotonic", "times": times}

    async def stream_predict(input_ids: torch.Tensor, body: dict):
        rid = "chatcmpl-" + uuid.uuid4().hex
        stop = StopOnFlag(times)
        streamer = TextIteratorStreamer(lm.tokenizer, skip_prompt=True, skip_special_tokens=True)
        temperature = float(body.get("temperature", 0.2))
        kwargs = dict(input_ids=input_ids, streamer=streamer, max_new_tokens=int(body.get("max_tokens", 512)),
                      do_sample=temperature > 0, stopping_criteria=StoppingCriteriaList([stop]),
                      eos_token_id=lm.tokenizer.eos_token_id, pad_token_id=lm.tokenizer.eos_token_id)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=float(body.get("top_p", 0.9)))
        Thread(target=lm.model.generate, kwargs=kwargs).start()
        try:
            yield chunk(rid, {"role": "assistant", "content": ""})
            for text in streamer:  # BUG: blocks the event loop until the next piece of text
                yield chunk(rid, {"content": text})
            yield chunk(rid, {}, "stop")
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:  # BUG: never reached; closing a generator at `yield` raises GeneratorExit
            stop.flag = True
            logger.warning("client disconnected: stop flag set")
            raise

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        ids = torch.tensor([lm.chat_prompt_ids(body["messages"])], device=lm.device)
        return StreamingResponse(stream_predict(ids, body), media_type="text/event-stream")

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description="the old demo's streaming pattern (buggy on purpose)")
    ap.add_argument("--model", default="default", help="any llama_lab.load_model source")
    ap.add_argument("--port", type=int, default=19327)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lm = load_model(args.model)
    uvicorn.run(create_app(lm), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
