"""Server benchmark: our OpenAI-compatible server against ``transformers serve``, same machine, same run.

    python -m bench.server_bench [--only ours|peer] [--quick]

Runs raw ``model.generate`` (in a subprocess) as the ceiling, then starts each server as a
subprocess on a free 127.0.0.1 port and drives it with httpx streaming clients:

* single stream: 128 tokens, greedy; tokens/s = completion tokens / (request start -> last token)
* 16 concurrent streams of 64 tokens: aggregate tokens/s over the whole burst
* a client leaves (mid-stream, a non-streaming request that timed out, during a long prefill):
  server CPU-seconds in the following 3 s, and how long until the server goes quiet
* 64 concurrent streams, half abandoned at random points: finished ones complete, the server
  answers afterwards, RSS back within 10% of where it started

Prints a table with ratios against the peers measured in the same run; the last stdout line is
one JSON object. See docs/bench_server.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import logging
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench._servers import (
    BENCH_DTYPE,
    ForeignLoad,
    OFFLINE_ENV,
    RunningServer,
    describe_env,
    model_dir,
    server_specs,
)

logger = logging.getLogger("server_bench")

TOPICS = [
    "the history of the Roman Empire", "how photosynthesis works", "the causes of the French Revolution",
    "the life cycle of stars", "the invention of the printing press", "how the human immune system works",
    "the history of the Internet", "climate change and its effects on oceans", "the Industrial Revolution in Britain",
    "how vaccines are developed", "the architecture of Gothic cathedrals", "the economics of international trade",
    "the migration of monarch butterflies", "the history of jazz music", "how earthquakes happen",
    "the exploration of Mars", "the rise of the Ottoman Empire", "how computers store data",
    "the water cycle", "the Renaissance in Italy", "the biology of sleep", "the history of chess",
    "how airplanes fly", "the Silk Road",
]

SINGLE_TOKENS = 128
CONC_STREAMS, CONC_TOKENS = 16, 64
ABANDON_STREAMS, ABANDON_TOKENS = 64, 64
LEAVE_WINDOW_S = 3.0
LONG_PROMPT_TOKENS = 6000
LONG_CONTEXT_TOKENS = 4000  # the long-context decode figure (issue 9: >= 0.7x the short-context speed)
CLIENT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
MAX_FOREIGN_CORES = 0.3  # other processes' load above which a timed figure is marked noisy (*)


def essay(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a long, detailed essay about {TOPICS[i % len(TOPICS)]}."}]


def long_prompt_text(mdir: Path, target_tokens: int) -> str:
    """A prompt of about ``target_tokens`` tokens (counted with the model's tokenizer)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(mdir / "tokenizer.json"))
    parts, n, i = [], 0, 0
    while n < target_tokens:
        para = (f"Section {i}. The committee reviewed item {i * 7 % 113} on the agenda, covering "
                f"{TOPICS[i % len(TOPICS)]}, and noted that the figures for district {i % 17} differ from "
                f"last year's by {i * 3 % 41} percent, which calls for a second look at the method used.\n")
        parts.append(para)
        n += len(tok.encode(para).ids)
        i += 1
    return "".join(parts) + "\nSummarize the sections above in one paragraph."


# ---------------------------------------------------------------- raw model.generate (subprocess)

RAW_CODE = r"""
import json, sys, time, statistics, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
mdir, repeats, long_text, n_new = sys.argv[1], int(sys.argv[2]), open(sys.argv[3]).read(), int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(mdir)
model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.bfloat16).eval()
def ids_of(text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)
essay = ids_of("Write a long, detailed essay about the history of the Roman Empire.")
with torch.inference_mode():
    model.generate(**essay, max_new_tokens=8, do_sample=False)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = model.generate(**essay, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        dt = time.perf_counter() - t
        runs.append((out.shape[1] - essay["input_ids"].shape[1]) / dt)
    long_ids = ids_of(long_text)
    t = time.perf_counter()
    model(**long_ids, logits_to_keep=1)
    prefill = time.perf_counter() - t
print(json.dumps({"tok_s": statistics.median(runs), "tok_s_runs": runs, "threads": torch.get_num_threads(),
                  "long_prompt_tokens": int(long_ids["input_ids"].shape[1]), "long_prefill_s": prefill}))
"""


async def run_raw(mdir: Path, repeats: int, long_text: str) -> dict:
    import os
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(long_text)
    await wait_quiet(None)
    load = ForeignLoad().start()
    try:
        res = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", RAW_CODE, str(mdir), str(repeats), f.name, str(SINGLE_TOKENS)],
            capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV}, timeout=900)
    finally:
        os.unlink(f.name)
    if res.returncode != 0:
        raise RuntimeError(f"raw generate failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["foreign_cores"] = round(load.cores(), 2)
    return out


# ---------------------------------------------------------------- clients

@dataclasses.dataclass
class StreamResult:
    t0: float = 0.0  # absolute perf_counter at request start
    status: int | None = None
    ttft: float | None = None  # seconds from start to first content
    t_last: float | None = None  # seconds from start to last content
    n_chunks: int = 0
    usage_tokens: int | None = None
    finish_reason: str | None = None
    done_marker: bool = False
    closed_ok: bool = False
    abandoned: bool = False
    error: str | None = None
    text: str = ""

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.n_chunks

    @property
    def tok_s(self) -> float:
        return self.tokens / self.t_last if self.t_last else 0.0


def chat_body(model: str, messages: list[dict], max_tokens: int, stream: bool) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def stream_chat(client: httpx.AsyncClient, srv: RunningServer, messages: list[dict], max_tokens: int,
                      abandon_after_chunks: int | None = None, result: StreamResult | None = None) -> StreamResult:
    """One streaming chat request; ``abandon_after_chunks`` closes the connection early (0: at headers)."""
    r = result or StreamResult()
    r.t0 = time.perf_counter()
    body = chat_body(srv.model_id, messages, max_tokens, stream=True)
    try:
        async with client.stream("POST", f"{srv.base_url}/v1/chat/completions", json=body) as resp:
            r.status = resp.status_code
            if resp.status_code != 200:
                r.error = (await resp.aread()).decode(errors="replace")[:300]
                return r
            if abandon_after_chunks == 0:
                r.abandoned = True
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    r.done_marker = True
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    r.error = str(obj["error"])[:300]
                    continue
                now = time.perf_counter() - r.t0
                for ch in obj.get("choices") or []:
                    content = (ch.get("delta") or {}).get("content")
                    if content:
                        r.n_chunks += 1
                        r.text += content
                        r.t_last = now
                        if r.ttft is None:
                            r.ttft = now
                    if ch.get("finish_reason"):
                        r.finish_reason = ch["finish_reason"]
                if obj.get("usage"):
                    r.usage_tokens = obj["usage"].get("completion_tokens")
                if abandon_after_chunks and r.n_chunks >= abandon_after_chunks:
                    r.abandoned = True
                    return r
            r.closed_ok = True
    except httpx.HTTPError as exc:
        r.error = f"{type(exc).__name__}: {exc}"[:300]
    return r


async def chat_once(client: httpx.AsyncClient, srv: RunningServer, messages: list[dict], max_tokens: int,
                    timeout: float | None = None) -> tuple[int | None, dict | str]:
    body = chat_body(srv.model_id, messages, max_tokens, stream=False)
    try:
        resp = await client.post(f"{srv.base_url}/v1/chat/completions", json=body,
                                 timeout=httpx.Timeout(timeout, connect=10.0) if timeout else CLIENT_TIMEOUT)
    except httpx.TimeoutException:
        return None, "client timeout"
    try:
        return resp.status_code, resp.json()
    except ValueError:
        return resp.status_code, resp.text[:300]


def new_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=CLIENT_TIMEOUT, limits=httpx.Limits(max_connections=256, max_keepalive_connections=0))


# ---------------------------------------------------------------- server-side measurements

async def wait_idle(srv: RunningServer, timeout: float = 120.0, step: float = 0.5, quiet_cpu: float = 0.03) -> float | None:
    """Seconds until the server spends < quiet_cpu CPU-s in two consecutive ``step`` windows; None on timeout."""
    t0 = time.perf_counter()
    prev, quiet_since = srv.cpu_seconds(), None
    while time.perf_counter() - t0 < timeout:
        t = time.perf_counter()
        await asyncio.sleep(step)
        cur = srv.cpu_seconds()
        if cur - prev < quiet_cpu:
            if quiet_since is None:
                quiet_since = t
            elif time.perf_counter() - quiet_since >= 2 * step:
                return quiet_since - t0
        else:
            quiet_since = None
        prev = cur
    return None


async def wait_quiet(srv: RunningServer | None, max_wait: float = 240.0) -> float:
    """Wait (up to max_wait) until other processes use < MAX_FOREIGN_CORES for 2 s; returns seconds waited."""
    t0 = time.perf_counter()
    quiet = 0
    while time.perf_counter() - t0 < max_wait:
        load = ForeignLoad(srv).start()
        await asyncio.sleep(1.0)
        quiet = quiet + 1 if load.cores() < MAX_FOREIGN_CORES else 0
        if quiet >= 2:
            break
    waited = time.perf_counter() - t0
    if waited > 3:
        logger.info("waited %.0f s for other processes to quieten", waited)
    return waited


async def after_leave(srv: RunningServer, left_at: float) -> dict:
    """CPU-seconds in the LEAVE_WINDOW_S after ``left_at``, then how long until the server went quiet."""
    c0 = srv.cpu_seconds()
    samples = [(time.perf_counter(), c0)]
    while time.perf_counter() - left_at < LEAVE_WINDOW_S:
        await asyncio.sleep(0.25)
        samples.append((time.perf_counter(), srv.cpu_seconds()))
    cpu = samples[-1][1] - c0
    busy_until = left_at
    for (ta, ca), (tb, cb) in zip(samples, samples[1:]):
        if cb - ca > 0.015:
            busy_until = tb
    settle = busy_until - left_at
    if samples[-1][0] - busy_until < 0.5:  # still busy at the end of the window: keep watching
        more = await wait_idle(srv, timeout=120.0)
        settle = (time.perf_counter() - left_at) if more is None else (samples[-1][0] - left_at + more)
    return {"cpu_s": round(cpu, 3), "settle_s": round(settle, 2)}


# ---------------------------------------------------------------- scenarios

async def warmup(client: httpx.AsyncClient, srv: RunningServer) -> None:
    status, _ = await chat_once(client, srv, essay(0), 8)
    if status != 200:
        raise RuntimeError(f"{srv.spec.name}: warm-up request failed with {status}: {_}")
    await asyncio.gather(*[stream_chat(client, srv, essay(i), 8) for i in range(4)])
    await wait_idle(srv, timeout=60)


async def compiled_step(client, srv) -> str | None:
    """Ours: whether this start built its compiled decode step or loaded the package a previous one left."""
    try:
        engine = (await client.get(f"{srv.base_url}/health")).json().get("engine") or {}
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    package = engine.get("compiled_package")
    return None if not package else ("loaded" if package.get("reused") else "built")


async def scenario_single(client, srv, repeats: int) -> dict:
    runs, foreign = [], []
    for _ in range(repeats):
        await wait_idle(srv, timeout=60)
        await wait_quiet(srv)
        load = ForeignLoad(srv).start()
        r = await stream_chat(client, srv, essay(0), SINGLE_TOKENS)
        foreign.append(load.cores())
        if r.error or not r.tokens:
            raise RuntimeError(f"{srv.spec.name}: single stream failed: {r.error}")
        runs.append(r)
    best = sorted(runs, key=lambda r: r.tok_s)[len(runs) // 2]
    return {
        "tok_s": round(statistics.median(r.tok_s for r in runs), 2),
        "tok_s_runs": [round(r.tok_s, 2) for r in runs],
        "ttft_ms": round(1000 * statistics.median(r.ttft for r in runs), 1),
        "tokens": best.tokens,
        "chunks": best.n_chunks,
        "done_marker": best.done_marker,
        "finish_reason": best.finish_reason,
        "text_sha1": hashlib.sha1(best.text.encode()).hexdigest()[:12],
        "text_head": best.text[:80],
        "foreign_cores": round(max(foreign), 2),
    }


async def scenario_single_long(client, srv, text: str, repeats: int) -> dict:
    """One stream after a ~4,000-token prompt: does decoding slow down as the context grows?
    Median of ``repeats`` runs, like the short-context figure it is compared with."""
    rates, ttfts, next_ttfts, foreign, tokens = [], [], [], [], 0
    for k in range(repeats):
        await wait_idle(srv, timeout=120)
        await wait_quiet(srv)
        load = ForeignLoad(srv).start()
        # each run opens with its own words, so no server can reuse an earlier run's prompt
        history = [{"role": "user", "content": f"(Run {k}, {time.time()}.) {text}"}]
        r = await stream_chat(client, srv, history, SINGLE_TOKENS // 2)
        foreign.append(load.cores())
        if r.error or not r.tokens:
            raise RuntimeError(f"{srv.spec.name}: long-context stream failed: {r.error}")
        decode_s = max((r.t_last or 0.0) - (r.ttft or 0.0), 1e-9)
        rates.append((r.tokens - 1) / decode_s)
        ttfts.append(r.ttft)
        tokens = r.tokens
        # the conversation's next turn: a chat client sends the whole history again
        await wait_idle(srv, timeout=120)
        nxt = await stream_chat(client, srv, history + [{"role": "assistant", "content": "Noted."},
                                                        {"role": "user", "content": "Summarise that in one line."}], 8)
        if nxt.error or not nxt.tokens:
            raise RuntimeError(f"{srv.spec.name}: next-turn stream failed: {nxt.error}")
        next_ttfts.append(nxt.ttft)
    return {"decode_tok_s": round(statistics.median(rates), 2), "decode_tok_s_runs": [round(x, 2) for x in rates],
            "ttft_ms": round(1000 * statistics.median(ttfts), 1), "tokens": tokens,
            "next_turn_ttft_ms": round(1000 * statistics.median(next_ttfts), 1),
            "foreign_cores": round(max(foreign), 2)}


async def scenario_concurrent(client, srv, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        await wait_idle(srv, timeout=120)
        await wait_quiet(srv)
        load = ForeignLoad(srv).start()
        c0 = srv.cpu_seconds()
        rs = await asyncio.gather(*[stream_chat(client, srv, essay(i), CONC_TOKENS) for i in range(CONC_STREAMS)])
        cpu = srv.cpu_seconds() - c0
        foreign = load.cores()
        bad = [r.error for r in rs if r.error or not r.tokens]
        if bad:
            raise RuntimeError(f"{srv.spec.name}: {len(bad)} concurrent streams failed: {bad[:3]}")
        start = min(r.t0 for r in rs)
        end = max(r.t0 + r.t_last for r in rs)
        tokens = sum(r.tokens for r in rs)
        runs.append({"agg_tok_s": tokens / (end - start), "tokens": tokens, "wall_s": end - start, "cpu_s": cpu,
                     "ttft_p50_ms": 1000 * statistics.median(r.ttft for r in rs),
                     "ttft_max_ms": 1000 * max(r.ttft for r in rs),
                     "stream_tok_s_p50": statistics.median(r.tok_s for r in rs), "foreign_cores": foreign})
    mid = sorted(runs, key=lambda x: x["agg_tok_s"])[len(runs) // 2]
    out = {k: round(v, 2) if isinstance(v, float) else v for k, v in mid.items()}
    out["agg_tok_s_runs"] = [round(x["agg_tok_s"], 2) for x in runs]
    return out


async def leave_mid_stream(client, srv, long_text: str) -> dict:
    r = await stream_chat(client, srv, essay(1), 1024, abandon_after_chunks=8)
    left = time.perf_counter()
    return {**await after_leave(srv, left), "chunks_before_leave": r.n_chunks, "error": r.error}


async def leave_non_stream_timeout(client, srv, long_text: str) -> dict:
    status, body = await chat_once(client, srv, essay(2), 1024, timeout=2.0)
    left = time.perf_counter()
    return {**await after_leave(srv, left), "client_saw": status or body}


async def leave_during_prefill(client, srv, long_text: str) -> dict:
    r = StreamResult()
    fresh = f"(Request {time.time()}.) {long_text}"  # a prompt no cache holds: the prefill really runs
    task = asyncio.create_task(stream_chat(client, srv, [{"role": "user", "content": fresh}], 64, result=r))
    await asyncio.sleep(1.0)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    left = time.perf_counter()
    return {**await after_leave(srv, left), "first_token_before_leave": r.ttft is not None, "status": r.status}


LEAVE_CASES = {"mid_stream": leave_mid_stream, "non_stream_timeout": leave_non_stream_timeout,
               "prefill": leave_during_prefill}


async def scenario_leave(client, srv, long_text: str, repeats: int) -> dict:
    out = {}
    for name, fn in LEAVE_CASES.items():
        runs = []
        for _ in range(repeats):
            await wait_idle(srv, timeout=180)
            await wait_quiet(srv)
            load = ForeignLoad(srv).start()
            runs.append(await fn(client, srv, long_text))
            runs[-1]["foreign_cores"] = round(load.cores(), 2)
        worst = max(runs, key=lambda x: x["cpu_s"])
        out[name] = {**worst, "cpu_s_runs": [x["cpu_s"] for x in runs]}
    return out


async def scenario_abandon(client, srv, seed: int = 1234) -> dict:
    rng = random.Random(seed)
    await wait_idle(srv, timeout=180)
    await wait_quiet(srv)
    rss0 = srv.rss()
    load = ForeignLoad(srv).start()
    abandon = set(rng.sample(range(ABANDON_STREAMS), ABANDON_STREAMS // 2))
    plan = {i: (rng.randint(0, ABANDON_TOKENS - 8) if i in abandon else None) for i in range(ABANDON_STREAMS)}
    peak = rss0
    stop = asyncio.Event()

    async def sample_rss():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, srv.rss())
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample_rss())
    t0 = time.perf_counter()
    rs = await asyncio.gather(*[stream_chat(client, srv, essay(i), ABANDON_TOKENS, abandon_after_chunks=plan[i])
                                for i in range(ABANDON_STREAMS)])
    wall = time.perf_counter() - t0
    foreign = load.cores()
    stop.set()
    await sampler
    settle = await wait_idle(srv, timeout=240)
    finished = [r for r in rs if not r.abandoned]

    def complete(r: StreamResult) -> bool:
        if r.error or not r.closed_ok or r.finish_reason not in ("stop", "length") or not r.text:
            return False
        return not (r.finish_reason == "length" and r.usage_tokens not in (None, ABANDON_TOKENS))

    status, body = await chat_once(client, srv, essay(3), 8, timeout=120)
    answered = status == 200 and bool(isinstance(body, dict) and body.get("choices"))
    await asyncio.sleep(2.0)
    rss1 = srv.rss()
    return {
        "streams": ABANDON_STREAMS, "abandoned": sum(r.abandoned for r in rs), "finished": len(finished),
        "complete": sum(complete(r) for r in finished),
        "incomplete_examples": [dataclasses.asdict(r) | {"text": r.text[-40:]} for r in finished if not complete(r)][:2],
        "done_markers": sum(r.done_marker for r in finished), "wall_s": round(wall, 1),
        "settle_s": None if settle is None else round(settle, 1), "answered_after": answered,
        "rss_start_mb": round(rss0 / 2**20, 1), "rss_peak_mb": round(peak / 2**20, 1),
        "rss_after_mb": round(rss1 / 2**20, 1), "rss_ratio": round(rss1 / rss0, 3), "alive": srv.alive,
        "foreign_cores": round(foreign, 2),
    }


async def probes(client, srv) -> dict:
    """Protocol quirks users notice: CORS preflight, unknown request fields."""
    pre = await client.request("OPTIONS", f"{srv.base_url}/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    body = chat_body(srv.model_id, essay(0), 4, stream=False) | {"ignore_eos": False, "some_unknown_field": 1}
    unk = await client.post(f"{srv.base_url}/v1/chat/completions", json=body)
    return {"options_status": pre.status_code, "unknown_field_status": unk.status_code}


async def bench_server(srv: RunningServer, args, long_text: str, long_context_text: str) -> dict:
    async with new_client() as client:
        await warmup(client, srv)
        res: dict = {"label": srv.spec.label, "cmd": srv.cmd, "startup_s": round(srv.startup_s, 1),
                     "model_id": srv.model_id, "rss_idle_mb": round(srv.rss() / 2**20, 1),
                     "compiled_step": await compiled_step(client, srv)}
        res["probes"] = await probes(client, srv)
        res["single"] = await scenario_single(client, srv, args.repeats)
        logger.info("%s single: %s", srv.spec.name, res["single"]["tok_s"])
        if not args.quick:
            res["single_long"] = await scenario_single_long(client, srv, long_context_text, args.repeats)
            logger.info("%s single at %d tokens: %s", srv.spec.name, LONG_CONTEXT_TOKENS, res["single_long"]["decode_tok_s"])
        heavy = not (args.quick and srv.spec.name == "peer")
        if heavy:
            res["concurrent"] = await scenario_concurrent(client, srv, max(1, args.repeats - 1))
            logger.info("%s concurrent: %s", srv.spec.name, res["concurrent"]["agg_tok_s"])
        res["leave"] = await scenario_leave(client, srv, long_text, 1 if args.quick else 2)
        logger.info("%s leave: %s", srv.spec.name, {k: v["cpu_s"] for k, v in res["leave"].items()})
        if heavy:
            res["abandon"] = await scenario_abandon(client, srv)
            logger.info("%s abandon: %s", srv.spec.name, res["abandon"])
        res["alive_at_end"] = srv.alive
        return res


# ---------------------------------------------------------------- report

def _get(d: dict | None, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1 else f"{v:.1f}"
    return str(v)


def _ratio(a, b) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or isinstance(a, bool) or not b:
        return "-"
    return f"{a / b:.2f}x"


def bar_checks(raw: dict | None, res: dict) -> dict:
    ours, peer, cb = res.get("ours"), res.get("peer"), res.get("peer-cb")
    if not ours:
        return {}

    def ge(a, b, k):
        return None if a is None or b is None else a >= k * b

    single = _get(ours, "single", "tok_s")
    agg = _get(ours, "concurrent", "agg_tok_s")
    checks = {
        "single_vs_raw_ge_0.95": ge(single, _get(raw, "tok_s"), 0.95),
        "single_vs_peer_ge_1.0": ge(single, _get(peer, "single", "tok_s"), 1.0),
        "conc16_vs_peer_cb_ge_1.0": ge(agg, _get(cb, "concurrent", "agg_tok_s"), 1.0),
        "conc16_vs_own_single_ge_4": ge(agg, single, 4.0),
    }
    prev = res.get("previous")
    checks["conc16_vs_previous_ge_1.5"] = ge(agg, _get(prev, "concurrent", "agg_tok_s"), 1.5)
    checks["single_vs_raw_ge_2.0"] = ge(single, _get(raw, "tok_s"), 2.0)
    long_rate, short_rate = _get(ours, "single_long", "decode_tok_s"), single
    checks["long_context_ge_0.7_short"] = ge(long_rate, short_rate, 0.7)
    for case in LEAVE_CASES:
        cpu = _get(ours, "leave", case, "cpu_s")
        checks[f"leave_{case}_cpu_lt_0.25"] = None if cpu is None else cpu < 0.25
    ab = ours.get("abandon")
    if ab:
        checks["abandon_all_finished_complete"] = ab["complete"] == ab["finished"]
        checks["abandon_answers_after"] = ab["answered_after"]
        checks["abandon_rss_within_10pct"] = ab["rss_ratio"] <= 1.10
    return checks


def print_report(raw: dict | None, res: dict, checks: dict) -> None:
    names = [n for n in ("peer", "peer-cb", "previous", "ours") if n in res]
    rows = [
        ("single: tok/s (128 tok)", ("single", "tok_s")),
        ("single: TTFT ms", ("single", "ttft_ms")),
        ("single: tokens produced", ("single", "tokens")),
        ("single @~4000-token prompt: decode tok/s", ("single_long", "decode_tok_s")),
        ("single @~4000-token prompt: TTFT ms", ("single_long", "ttft_ms")),
        ("… its next turn (history resent): TTFT ms", ("single_long", "next_turn_ttft_ms")),
        ("16x64: aggregate tok/s", ("concurrent", "agg_tok_s")),
        ("16x64: TTFT p50 ms", ("concurrent", "ttft_p50_ms")),
        ("16x64: TTFT max ms", ("concurrent", "ttft_max_ms")),
        ("16x64: per-stream tok/s p50", ("concurrent", "stream_tok_s_p50")),
        ("16x64: server CPU-s", ("concurrent", "cpu_s")),
        ("leave mid-stream: CPU-s in 3 s", ("leave", "mid_stream", "cpu_s")),
        ("leave mid-stream: busy for s", ("leave", "mid_stream", "settle_s")),
        ("leave non-stream: CPU-s in 3 s", ("leave", "non_stream_timeout", "cpu_s")),
        ("leave non-stream: busy for s", ("leave", "non_stream_timeout", "settle_s")),
        ("leave in prefill: CPU-s in 3 s", ("leave", "prefill", "cpu_s")),
        ("leave in prefill: busy for s", ("leave", "prefill", "settle_s")),
        ("64 abandon: finished", ("abandon", "finished")),
        ("64 abandon: complete", ("abandon", "complete")),
        ("64 abandon: [DONE] seen", ("abandon", "done_markers")),
        ("64 abandon: answers after", ("abandon", "answered_after")),
        ("64 abandon: RSS start MB", ("abandon", "rss_start_mb")),
        ("64 abandon: RSS peak MB", ("abandon", "rss_peak_mb")),
        ("64 abandon: RSS after MB", ("abandon", "rss_after_mb")),
        ("64 abandon: RSS after/start", ("abandon", "rss_ratio")),
        ("64 abandon: busy after s", ("abandon", "settle_s")),
        ("OPTIONS preflight status", ("probes", "options_status")),
        ("unknown field status", ("probes", "unknown_field_status")),
        ("stream ends with [DONE]", ("single", "done_marker")),
        ("startup s (to /health)", ("startup_s",)),
        ("startup: compiled step", ("compiled_step",)),
        ("RSS after warm-up MB", ("rss_idle_mb",)),
    ]
    header = ["metric", "raw generate", *[res[n]["label"] for n in names]]
    if "ours" in res:
        header += [f"ours/{n}" for n in names if n != "ours"] + ["ours/raw"]
    def noisy(d: dict | None, path: tuple) -> bool:
        scope = path[:2] if path[:1] == ("leave",) else path[:1]
        f = _get(d, *scope, "foreign_cores")
        return isinstance(f, (int, float)) and f > MAX_FOREIGN_CORES

    table = []
    for label, path in rows:
        vals = [_get(res[n], *path) for n in names]
        rawv = _get(raw, "tok_s") if path == ("single", "tok_s") else None
        row = [label, _fmt(rawv) + ("*" if rawv and noisy(raw, ()) else ""),
               *[_fmt(v) + ("*" if v is not None and noisy(res[n], path) else "") for v, n in zip(vals, names)]]
        if "ours" in res:
            ov = _get(res["ours"], *path)
            numeric = label.split(":")[-1].strip().startswith(("tok/s", "aggregate", "TTFT", "per-stream"))
            row += [_ratio(ov, _get(res[n], *path)) if numeric else "" for n in names if n != "ours"]
            row += [_ratio(ov, rawv) if rawv else ""]
        table.append(row)
    widths = [max(len(str(r[i])) for r in [header, *table]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    if raw:
        print(f"\nraw model.generate: {raw['tok_s']:.1f} tok/s (runs {[round(x, 1) for x in raw['tok_s_runs']]}), "
              f"{raw['threads']} torch threads; long prompt {raw['long_prompt_tokens']} tokens prefills in "
              f"{raw['long_prefill_s']:.1f} s")
    print(f"* = other processes used > {MAX_FOREIGN_CORES} cores while this was measured (shared machine): noisy")
    if checks:
        print("\nBar (issue 3), ours:")
        for k, v in checks.items():
            print(f"  {'PASS' if v else ('n/a ' if v is None else 'FAIL')}  {k}")


async def amain(args) -> dict:
    mdir = model_dir(args.model_dir)
    logger.info("model dir: %s", mdir)
    long_text = long_prompt_text(mdir, LONG_PROMPT_TOKENS)
    long_context_text = long_prompt_text(mdir, LONG_CONTEXT_TOKENS)
    specs = server_specs(args.ours_cmd, None if args.no_baseline else args.baseline_ref)
    names = {"ours": ["ours"], "peer": ["peer", "peer-cb"], "previous": ["previous"],
             None: ["peer", "peer-cb", "previous", "ours"]}[args.only]
    names = [n for n in names if n in specs]
    raw = None
    if not args.no_raw:
        raw = await run_raw(mdir, args.repeats, long_text)
        logger.info("raw generate: %.1f tok/s", raw["tok_s"])
    res = {}
    for name in names:
        try:
            with RunningServer(specs[name], mdir) as srv:
                res[name] = await bench_server(srv, args, long_text, long_context_text)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other servers
            logger.error("%s failed: %s", name, exc)
            res[name] = {"label": specs[name].label, "error": str(exc)[:2000]}
    checks = bar_checks(raw, res)
    print_report(raw, {k: v for k, v in res.items()}, checks)
    return {"bench": "server", "model_dir": str(mdir), "dtype": BENCH_DTYPE, "env": describe_env(),
            "quick": args.quick, "repeats": args.repeats, "raw_generate": raw, "servers": res, "bar": checks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["ours", "peer", "previous"],
                    help="run only our server, only transformers serve (plain + CB), or only the previous engine's server")
    ap.add_argument("--baseline-ref", default="2c15f58", help="git ref whose server is the 'previous' side")
    ap.add_argument("--no-baseline", action="store_true", help="skip the previous engine's server")
    ap.add_argument("--quick", action="store_true", help="one repeat; plain transformers serve skips 16x64 and 64-abandon")
    ap.add_argument("--repeats", type=int, default=None, help="repeats of the timed scenarios (default 3, quick 1)")
    ap.add_argument("--model-dir", help="HF-layout model directory (default: llama_lab's cached copy of the embedded GGUF)")
    ap.add_argument("--ours-cmd", help="command line for our server, with {port} (and {python}, {model_dir})")
    ap.add_argument("--no-raw", action="store_true", help="skip raw model.generate")
    ap.add_argument("--json-out", help="also write the JSON result to this file")
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out = asyncio.run(amain(args))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps(out, default=str))
    return 0 if all(v is not False for v in out["bar"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
