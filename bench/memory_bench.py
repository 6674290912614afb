"""What a GGUF model adds to the server's resident memory, against issue 16's bar.

    python -m bench.memory_bench                       # the embedded GGUF, compiled step and eager
    python -m bench.memory_bench --model path/to/model.gguf --sides compiled

Each side is a real ``llama-lab serve`` process. After it answers one chat request (and two idle
seconds, in which the engine hands freed memory back), its ``/health`` gives the process's RSS and
what the model added to it since just before the load (``memory.model_adds_mb``: weights, tokenizer,
the libraries' modules the load imports, the engine's buffers, and the KV-cache pages written). The
bar: at most 1.5x the GGUF file plus the KV cache actually used (``engine.kv_cache_touched_mb``).
The compiled side waits for its package (built once per model and machine) before the request.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx

from llama_lab.profiling import cpu_kind
from llama_lab.web.launcher import ServerProcess

SIDES = {"compiled": ["--compile", "--no-compile-in-background"], "eager": ["--no-compile"]}
PROMPT = "Write three sentences about the sea."


def measure(model: str, flags: list[str], max_tokens: int) -> dict:
    argv = ["{python}", "-m", "llama_lab", "serve", "--model", model, "--host", "127.0.0.1", "--port", "{port}", *flags]
    with ServerProcess(argv, startup_timeout_s=900) as srv:
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 0}
        answer = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=300)
        answer.raise_for_status()
        time.sleep(2)
        health = httpx.get(srv.url + "/health", timeout=10).json()
    engine, memory = health["engine"], health["memory"]
    return {"decode": engine.get("decode"), "shares_weights": (engine.get("compiled_package") or {}).get("shares_weights"),
            "rss_mb": memory["rss_mb"], "weights_mb": memory["weights_mb"], "model_adds_mb": memory["model_adds_mb"],
            "kv_touched_mb": engine.get("kv_cache_touched_mb"), "usage": answer.json()["usage"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="'default' (the embedded GGUF) or a .gguf file")
    ap.add_argument("--sides", default="compiled,eager", help=f"comma list of {', '.join(SIDES)}")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        ap.error(f"--sides: unknown side(s) {', '.join(unknown)} (choose from {', '.join(SIDES)})")
    if args.model == "default":
        from llama_lab.model.loading import embedded_gguf_path

        gguf = embedded_gguf_path()
    else:
        gguf = Path(args.model)
        if gguf.suffix.lower() != ".gguf" or not gguf.is_file():
            ap.error(f"--model: {args.model!r} is not a .gguf file")
    file_mb = gguf.stat().st_size / 2**20
    print(f"# {gguf.name}: {file_mb:.1f} MiB on disk; CPU: {cpu_kind()}")
    print(f"{'side':<10}{'RSS MB':>9}{'weights':>9}{'KV used':>9}{'adds':>8}{'bar':>8}{'adds/bar':>10}  decode")
    results = {}
    for side in sides:
        r = measure(args.model, SIDES[side], args.max_tokens)
        bar = 1.5 * file_mb + (r["kv_touched_mb"] or 0.0)
        r["bar_mb"], r["ratio"] = round(bar, 1), round(r["model_adds_mb"] / bar, 3)
        results[side] = r
        print(f"{side:<10}{r['rss_mb']:>9.0f}{r['weights_mb']:>9.1f}{r['kv_touched_mb']:>9.1f}{r['model_adds_mb']:>8.1f}"
              f"{bar:>8.1f}{r['ratio']:>10.2f}  {r['decode']}" + ("" if r["shares_weights"] is None
                                                                 else f" (package shares the weights: {r['shares_weights']})"))
    print(json.dumps({"bench": "memory", "gguf": gguf.name, "file_mb": round(file_mb, 1), "cpu": cpu_kind(),
                      "results": results}))


if __name__ == "__main__":
    main()
