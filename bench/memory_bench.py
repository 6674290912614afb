"""What a GGUF model adds to the server's resident memory, against issue 16's bar.

    python -m bench.memory_bench                       # the embedded GGUF, compiled step and eager
    python -m bench.memory_bench --model path/to/model.gguf --sides compiled

Each side is a real ``llama-lab serve`` process. After it answers one chat request (and two idle
seconds, in which the engine hands freed memory back), its ``/health`` gives the process's RSS and
what the model added to it since just before the load (``memory.model_adds_mb``: weights, tokenizer,
the libraries' modules the load imports, the engine's buffers, and the KV-cache pages written). The
bar: at most 1.5x the GGUF file plus the KV cache actually used (``engine.kv_cache_touched_mb``).
The compiled side waits for its package (built once per model and machine) before the request. A
start that had to build the package holds the compiler's memory too, which is no measure of serving:
that side then starts once more, on the package now cached, and reports the second start.

The "libs" column is the shared libraries' code the server has resident (all of it, not only what the
load added). It depends on the kernel's page cache as well as on the server: the same server measured
44.0 MiB of ``libtorch_cpu.so`` pages added by the load while that file's page cache was as ``pip
install`` had written it, and 15.5 MiB after the page cache was dropped and the file read back from disk
(as after a reboot; Linux 6.18, ext4, 2026-12-06), a 29 MiB swing in ``adds`` with no change in the
process. ``--drop-library-cache`` drops the page cache of torch's and the venv's shared libraries before
each start (``posix_fadvise(DONTNEED)``: nothing is lost, the kernel reads them back) so two runs
compare like with like; the output says whether it was used.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time
from pathlib import Path

import httpx

from llama_lab.profiling import cpu_kind
from llama_lab.web.launcher import ServerProcess

SIDES = {"compiled": ["--compile", "--no-compile-in-background"], "eager": ["--no-compile"]}
PROMPT = "Write three sentences about the sea."


def drop_library_cache() -> int:
    """Drop the page cache of the installed packages' shared libraries (torch's among them); returns how
    many files."""
    count = 0
    roots = {Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}
    for lib in (path for root in roots for path in root.rglob("*.so*")):
        try:
            fd = os.open(lib, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            count += 1
        finally:
            os.close(fd)
    return count


def resident_by_kind(pid: int) -> dict[str, float]:
    """The process's resident MiB in shared-library code (``.so`` files) and in anonymous memory."""
    import psutil

    libs = anon = 0
    for region in psutil.Process(pid).memory_maps(grouped=True):
        if ".so" in Path(region.path).name:
            libs += region.rss
        elif not region.path.startswith("/"):  # [heap], [stack], [anon]: no file behind them
            anon += region.rss
    return {"libs_mb": round(libs / 2**20, 1), "anon_mb": round(anon / 2**20, 1)}


def measure(model: str, flags: list[str], max_tokens: int) -> dict:
    argv = ["{python}", "-m", "llama_lab", "serve", "--model", model, "--host", "127.0.0.1", "--port", "{port}", *flags]
    with ServerProcess(argv, startup_timeout_s=900) as srv:
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 0}
        answer = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=300)
        answer.raise_for_status()
        time.sleep(2)
        health = httpx.get(srv.url + "/health", timeout=10).json()
        kinds = resident_by_kind(srv.pid)
    engine, memory = health["engine"], health["memory"]
    package = engine.get("compiled_package") or {}
    return {"decode": engine.get("decode"), "shares_weights": package.get("shares_weights"),
            "built_package": package.get("reused") is False,
            "rss_mb": memory["rss_mb"], "weights_mb": memory["weights_mb"], "model_adds_mb": memory["model_adds_mb"],
            "kv_touched_mb": engine.get("kv_cache_touched_mb"), **kinds, "usage": answer.json()["usage"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="'default' (the embedded GGUF) or a .gguf file")
    ap.add_argument("--sides", default="compiled,eager", help=f"comma list of {', '.join(SIDES)}")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--drop-library-cache", action="store_true",
                    help="drop the shared libraries' page cache before each start (see above)")
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
    print(f"# {gguf.name}: {file_mb:.1f} MiB on disk; CPU: {cpu_kind()}; library page cache "
          + ("dropped before each start" if args.drop_library_cache else "as found"))
    print(f"{'side':<10}{'RSS MB':>9}{'libs':>7}{'anon':>7}{'weights':>9}{'KV used':>9}{'adds':>8}{'bar':>8}"
          f"{'adds/bar':>10}  decode")
    results = {}
    for side in sides:
        if args.drop_library_cache:
            print(f"# {side}: dropped the page cache of {drop_library_cache()} shared libraries")
        r = measure(args.model, SIDES[side], args.max_tokens)
        if r["built_package"]:
            print(f"# {side}: this start built the compiled package; measuring a second start that reuses it")
            if args.drop_library_cache:
                drop_library_cache()
            r = measure(args.model, SIDES[side], args.max_tokens)
        bar = 1.5 * file_mb + (r["kv_touched_mb"] or 0.0)
        r["bar_mb"], r["ratio"] = round(bar, 1), round(r["model_adds_mb"] / bar, 3)
        results[side] = r
        print(f"{side:<10}{r['rss_mb']:>9.0f}{r['libs_mb']:>7.0f}{r['anon_mb']:>7.0f}{r['weights_mb']:>9.1f}{r['kv_touched_mb']:>9.1f}{r['model_adds_mb']:>8.1f}"
              f"{bar:>8.1f}{r['ratio']:>10.2f}  {r['decode']}" + ("" if r["shares_weights"] is None
                                                                 else f" (package shares the weights: {r['shares_weights']})"))
    print(json.dumps({"bench": "memory", "gguf": gguf.name, "file_mb": round(file_mb, 1), "cpu": cpu_kind(),
                      "library_cache_dropped": args.drop_library_cache,
                      "results": results}))


if __name__ == "__main__":
    main()
