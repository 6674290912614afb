"""Gateway overhead: median added latency per request and streaming throughput kept, vs. direct.

Starts a backend (``llama-lab serve --model random:tiny``) and a gateway in front of it as
separate processes on 127.0.0.1, then alternates identical requests direct / through the gateway
so drift hits both sides alike. Prints a table, then one JSON line for scripts.

    python -m bench.bench_gateway [--requests 100] [--stream-tokens 128] [--rounds 4]
    python -m bench.bench_gateway --backend-url http://127.0.0.1:19327
    python -m bench.bench_gateway --limits --baseline-ref 30a8614   # limits on, against an earlier gateway

``--limits`` gives the bench token a quota, requests and tokens per minute, a limit on requests in flight
and the same per-minute limits for the bench's model (all far above what the bench uses), so every check
of the admission and the settle's tokens-per-minute correction runs. ``--baseline-ref`` adds a gateway from
that commit of this repository (``git archive``; its token gets a quota, the one limit it had), run in
the same alternation, and reports our overhead against its overhead.
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
    parser.add_argument("--limits", action="store_true", help="quota, rpm_limit, tpm_limit, max_parallel and a per-model limit on the bench token")
    parser.add_argument("--baseline-ref", help="also time the gateway of this git ref (e.g. 30a8614)")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        backend = args.backend_url
        if backend is None:
            backend = stack.enter_context(ServerProcess(
                llama_lab_command("serve", "--model", args.serve_model, "--host", "127.0.0.1"), name="backend")).url
        args.model = args.model or httpx.get(backend + "/v1/models").json()["data"][0]["id"]
        def start_gateway(name: str, tree: Path | None = None) -> str:
            env = {"PYTHONPATH": str(tree)} if tree is not None else None
            return stack.enter_context(ServerProcess(
                llama_lab_command("gateway", "--db", f"sqlite:///{Path(tmp) / (name + '.db')}", "--admin-key", ADMIN_KEY,
                                  "--log-level", "warning"), name=name, env=env, cwd=tree)).url

        def token_for(url: str, limits: dict) -> str:
            admin = {"authorization": f"Bearer {ADMIN_KEY}"}
            httpx.post(url + "/api/channels", headers=admin,
                       json={"name": "bench", "base_url": backend, "models": [args.model]}).raise_for_status()
            made = httpx.post(url + "/api/tokens", headers=admin, json={"name": "bench", **limits})
            made.raise_for_status()
            return made.json()["key"]

        limits = {"quota": 10**15, "rpm_limit": 10**6, "tpm_limit": 10**12, "max_parallel": 10**4,
                  "model_limits": {args.model: {"rpm": 10**6, "tpm": 10**12}}} if args.limits else {}
        ours = start_gateway("gateway")
        sides = {"direct": (backend, "none"), "gateway": (ours, token_for(ours, limits))}
        if args.baseline_ref:
            from bench._servers import baseline_tree

            url = start_gateway("baseline", baseline_tree(args.baseline_ref))
            sides["baseline"] = (url, token_for(url, {"quota": 10**15} if args.limits else {}))

        lat: dict[str, list[float]] = {name: [] for name in sides}
        tps: dict[str, list[float]] = {name: [] for name in sides}
        with httpx.Client(timeout=300) as client:
            for url, key in sides.values():  # warm up every path (connections, caches, first-token compile)
                for _ in range(5):
                    one_request(client, url, key, args.model, 1, False)
                one_request(client, url, key, args.model, 16, True)
            for _ in range(args.requests):  # alternating, so drift hits every side alike
                for name, (url, key) in sides.items():
                    lat[name].append(one_request(client, url, key, args.model, 1, False)[0])
            for _ in range(args.rounds):
                for name, (url, key) in sides.items():
                    seconds, chunks = one_request(client, url, key, args.model, args.stream_tokens, True)
                    tps[name].append(chunks / seconds)
    direct_lat, gw_lat, direct_tps, gw_tps = lat["direct"], lat["gateway"], tps["direct"], tps["gateway"]

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
    if "baseline" in lat:
        base = statistics.median([(b - d) * 1000 for d, b in zip(direct_lat, lat["baseline"])])
        result["baseline_ref"], result["baseline_overhead_median_ms"] = args.baseline_ref, round(base, 3)
        result["overhead_vs_baseline"] = round(overhead / base, 2) if base > 0 else None
        print(f"the gateway at {args.baseline_ref} adds {base:.2f} ms median; ours{' with limits on' if args.limits else ''} "
              f"{overhead:.2f} ms ({result['overhead_vs_baseline']}x; bar: <= 1.2x)")
    result["limits"] = args.limits
    print(json.dumps(result))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
