"""Gateway overhead: median added latency per request and streaming throughput kept, vs. direct.

Starts a backend (``llama-lab serve --model random:tiny``) and a gateway in front of it as
separate processes on 127.0.0.1, then alternates identical requests direct / through the gateway
so drift hits both sides alike. Prints a table, then one JSON line for scripts.

    python -m bench.bench_gateway [--requests 100] [--stream-tokens 128] [--rounds 4]
    python -m bench.bench_gateway --backend-url http://127.0.0.1:19327
"""

from __future__ import annotations

import argparse
import json
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from llama_lab.web.launcher import ServerProcess, llama_lab_command

ADMIN_KEY = "bench-admin"


def one_request(client: httpx.Client, url: str, key: str, model: str, max_tokens: int, stream: bool) -> tuple[float, int]:
    """Seconds for the whole answer, and the content chunks received."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": max_tokens, "stream": stream}
    if stream:
        body["ignore_eos"] = True  # honoured by our server; others ignore it
    headers = {"authorization": f"Bearer {key}"}
    start = time.perf_counter()
    chunks = 0
    if stream:
        with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    chunks += 1
    else:
        resp = client.post(url + "/v1/chat/completions", json=body, headers=headers)
        resp.raise_for_status()
        chunks = resp.json()["usage"]["completion_tokens"]
    return time.perf_counter() - start, chunks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend-url", help="use this running backend instead of starting one")
    parser.add_argument("--serve-model", default="random:tiny", help="what `llama-lab serve --model` loads")
    parser.add_argument("--model", help="model name in requests (default: the backend's first in /v1/models)")
    parser.add_argument("--requests", type=int, default=100, help="latency samples per side (max_tokens=1, not streamed)")
    parser.add_argument("--stream-tokens", type=int, default=128, help="max_tokens of each throughput request")
    parser.add_argument("--rounds", type=int, default=4, help="streamed requests per side")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        backend = args.backend_url
        if backend is None:
            backend = stack.enter_context(ServerProcess(
                llama_lab_command("serve", "--model", args.serve_model, "--host", "127.0.0.1"), name="backend")).url
        args.model = args.model or httpx.get(backend + "/v1/models").json()["data"][0]["id"]
        gateway = stack.enter_context(ServerProcess(
            llama_lab_command("gateway", "--db", f"sqlite:///{Path(tmp) / 'gw.db'}", "--admin-key", ADMIN_KEY,
                              "--log-level", "warning"), name="gateway")).url
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        httpx.post(gateway + "/api/channels", headers=admin, json={"name": "bench", "base_url": backend, "models": [args.model]}).raise_for_status()
        key = httpx.post(gateway + "/api/tokens", headers=admin, json={"name": "bench"}).json()["key"]

        with httpx.Client(timeout=300) as client:
            for url in (backend, gateway):  # warm up both paths (connections, caches, first-token compile)
                for _ in range(5):
                    one_request(client, url, key, args.model, 1, False)
                one_request(client, url, key, args.model, 16, True)
            direct_lat, gw_lat = [], []
            for _ in range(args.requests):
                direct_lat.append(one_request(client, backend, key, args.model, 1, False)[0])
                gw_lat.append(one_request(client, gateway, key, args.model, 1, False)[0])
            direct_tps, gw_tps = [], []
            for _ in range(args.rounds):
                for url, out in ((backend, direct_tps), (gateway, gw_tps)):
                    seconds, chunks = one_request(client, url, key, args.model, args.stream_tokens, True)
                    out.append(chunks / seconds)

    d_med, g_med = statistics.median(direct_lat) * 1000, statistics.median(gw_lat) * 1000
    overhead = statistics.median([(g - d) * 1000 for d, g in zip(direct_lat, gw_lat)])
    d_tps, g_tps = statistics.median(direct_tps), statistics.median(gw_tps)
    kept = g_tps / d_tps
    print(f"{'':34}{'direct':>12}{'gateway':>12}")
    print(f"{'median latency, 1 token (ms)':34}{d_med:>12.2f}{g_med:>12.2f}")
    print(f"{'streaming throughput (chunks/s)':34}{d_tps:>12.1f}{g_tps:>12.1f}")
    print(f"gateway adds {overhead:.2f} ms median per request (bar: <= 3 ms); keeps {kept:.1%} of direct throughput (bar: >= 97%)")
    result = {
        "bench": "gateway", "model": args.model, "requests": args.requests, "stream_tokens": args.stream_tokens,
        "direct_median_ms": round(d_med, 3), "gateway_median_ms": round(g_med, 3), "overhead_median_ms": round(overhead, 3),
        "direct_stream_tps": round(d_tps, 1), "gateway_stream_tps": round(g_tps, 1), "throughput_kept": round(kept, 4),
        "pass": overhead <= 3.0 and kept >= 0.97,
    }
    print(json.dumps(result))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
