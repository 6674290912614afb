"""Start-up time and memory of ``llama-lab serve --compile``: this tree against an earlier commit, one run.

    python -m bench.startup_bench                          # against 181788d (the torch.compile step)
    python -m bench.startup_bench --baseline-ref <ref> --starts 3

Each side starts ``--starts`` times in turn: seconds until ``/health`` answers, then one short chat
request, two idle seconds, then the RSS of the server with its child processes (torch.compile leaves compile workers
running) and of the server process alone. This tree's first start may build its compiled-step package (the
``/health`` engine block says whether a start built or loaded it); later starts load it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx

from bench._servers import baseline_tree
from llama_lab.web.launcher import ServerProcess

SERVE = ["{python}", "-m", "llama_lab", "serve", "--model", "default", "--host", "127.0.0.1", "--port", "{port}",
         "--dtype", "bf16", "--compile"]


def one_start(env: dict[str, str], cwd: Path | None) -> dict:
    with ServerProcess(SERVE, env=env, cwd=cwd, startup_timeout_s=900) as srv:
        engine = httpx.get(srv.url + "/health", timeout=10).json().get("engine") or {}
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "temperature": 0}
        httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120).raise_for_status()
        time.sleep(2)  # idle: the engine hands freed memory back to the OS once its batch empties
        package = engine.get("compiled_package")
        import psutil

        return {"to_health_s": round(srv.startup_s, 1), "rss_mb": round(srv.rss() / 2**20),
                "rss_main_mb": round(psutil.Process(srv.pid).memory_info().rss / 2**20),
                "decode": engine.get("decode"),
                "compiled_step": None if not package else ("loaded" if package["reused"] else "built")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-ref", default="181788d")
    ap.add_argument("--starts", type=int, default=2)
    args = ap.parse_args()
    tree = baseline_tree(args.baseline_ref)
    sides = {"this tree": ({}, None), f"@{args.baseline_ref}": ({"PYTHONPATH": str(tree)}, tree)}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(args.starts):
        for name, (env, cwd) in sides.items():
            runs[name].append(one_start(env, cwd))
    print(f"{'side':<16}{'start':>6}{'to /health s':>14}{'RSS MB':>9}{'main':>7}  compiled step")
    for name, rs in runs.items():
        for i, r in enumerate(rs, 1):
            print(f"{name:<16}{i:>6}{r['to_health_s']:>14}{r['rss_mb']:>9}{r['rss_main_mb']:>7}  "
                  f"{r['compiled_step'] or r['decode']}")
    print(json.dumps({"bench": "startup", "runs": runs}))


if __name__ == "__main__":
    main()
