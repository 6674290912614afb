"""Decode speed when the machine is busy: quiet, one busy process, two busy processes, in one run.

    python -m bench.contention_bench                          # ours (automatic threads), pinned to every core, in-kernel
    python -m bench.contention_bench --baseline 30a8614       # also the server as it was at a commit
    python -m bench.contention_bench --llama-server ~/llama.cpp/build/bin/llama-server

Each side is a server subprocess (the embedded SmolLM2, greedy, eos ignored). One stream of
``--tokens`` tokens is timed ``--repeats`` times per phase; tokens/s is the decode rate after the
first token, and a stream still running after ``--max-seconds`` is cut there and rated on what it
sent. The busy processes are ``python -c "while True: pass"``, started before the phase and left
running through it. After the last phase the busy processes stop and a stream keeps running until
``/health`` shows every thread back (ours only): that is the "back within seconds" figure.

Sides:
  auto      ``llama-lab serve``: the thread count follows the machine (engine/threads.py)
  pinned    ``llama-lab serve --threads <all CPUs>``: every core whatever the load (the old behaviour)
  kernel    ``llama_lab.serve()`` inside a process whose main thread computes like a notebook cell (pure
            Python); there "1 busy" is the cell, "2 busy" the cell and one busy process
  baseline  ``--baseline REF``: this repository at REF (its own cache dir, so the packages do not evict
            each other), today's code for the quiet-speed bar
  llama.cpp ``--llama-server PATH`` with ``-t <all CPUs>`` on the embedded GGUF; skipped, saying so, without it

The machine is named (model, AVX2-only or AVX512) and every phase reports the CPU that other
processes used meanwhile (beyond the bench's own busy processes): on a shared machine that is the
noise. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from bench._servers import baseline_tree
from bench.peer_bench import peer_dir, peer_env
from llama_lab.profiling import cpu_kind
from llama_lab.web.launcher import ServerProcess

logger = logging.getLogger("contention_bench")

PROMPT = "Write a long story about a lighthouse keeper and a storm."
BUSY = "while True: pass"


def find_llama_server(given: str | None) -> tuple[Path | None, str]:
    """The llama.cpp server to compare with, or None and why not."""
    if given:
        path = Path(given).expanduser()
        return (path, "") if path.is_file() and os.access(path, os.X_OK) else (None, f"{given} is not an executable file")
    found = shutil.which("llama-server")
    if found:
        return Path(found), ""
    from llama_lab.model.loading import cache_root

    # peer_bench's build for this CPU first, then any other build in the cache
    for candidate in [peer_dir() / "llama-server", *sorted(cache_root().glob("**/bin/llama-server"))]:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate, ""
    return None, f"no llama-server on PATH or under {cache_root()} (pass --llama-server PATH)"


class Busy:
    """``n`` busy loops: processes, except that the in-kernel side's first one is a "cell" in the server's own
    process (the bench creates ``cell_flag``; the server's main thread computes while it exists)."""

    def __init__(self, n: int, cell_flag: Path | None = None) -> None:
        self.cell_flag = cell_flag if n and cell_flag is not None else None
        if self.cell_flag is not None:
            self.cell_flag.touch()
            n -= 1
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.procs:
            try:
                t = psutil.Process(p.pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def stop(self) -> None:
        if self.cell_flag is not None:
            self.cell_flag.unlink(missing_ok=True)
        for p in self.procs:
            p.kill()
            p.wait()


class Foreign:
    """CPU used by processes other than the server, the bench and its busy processes, over a span."""

    def __init__(self, server: ServerProcess, busy: Busy) -> None:
        self.server, self.busy, self.me = server, busy, psutil.Process()
        self.t0, self.b0 = time.perf_counter(), self._total()

    def _total(self) -> float:
        t = psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        mine = self.me.cpu_times()
        return busy - self.server.cpu_seconds() - self.busy.cpu_seconds() - mine.user - mine.system

    def cores(self) -> float:
        return max(0.0, (self._total() - self.b0) / (time.perf_counter() - self.t0))


def stream_rate(url: str, model: str, tokens: int, max_seconds: float) -> float:
    """Decode tokens/s of one greedy stream after its first token (0 if fewer than two came)."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    stamps: list[float] = []
    deadline = time.perf_counter() + max_seconds
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=max_seconds + 60) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                stamps.append(time.perf_counter())
            if time.perf_counter() > deadline:
                break
    if len(stamps) < 2:
        return 0.0
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def threads_info(url: str) -> dict | None:
    try:
        return httpx.get(f"{url}/health", timeout=10).json().get("engine", {}).get("threads")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def measure(server: ServerProcess, model: str, args: argparse.Namespace, busy: int, cell_flag: Path | None) -> dict:
    procs = Busy(busy, cell_flag)
    try:
        time.sleep(0.5 if busy else 0)
        foreign = Foreign(server, procs)
        rates, threads = [], []
        for _ in range(args.repeats):
            rates.append(stream_rate(server.url, model, args.tokens, args.max_seconds))
            info = threads_info(server.url)
            threads.append(info["threads"] if info else None)
        result = {"tok_s": round(statistics.median(rates), 1), "runs": [round(r, 1) for r in rates],
                  "threads": threads, "others_cpu": round(foreign.cores(), 2)}
        info = threads_info(server.url)
        if busy and args.recovery and info is not None and info["reason"] != "pinned":
            procs.stop()
            result["back_to_max_s"] = recovery(server, model, args)
    finally:
        procs.stop()
    return result


def recovery(server: ServerProcess, model: str, args: argparse.Namespace) -> float | None:
    """Seconds from the busy processes' end until /health shows every thread back, a stream running meanwhile."""
    import threading

    started, stop = time.perf_counter(), threading.Event()

    def keep_decoding() -> None:
        while not stop.is_set():
            stream_rate(server.url, model, 16, 5)

    worker = threading.Thread(target=keep_decoding, daemon=True)
    worker.start()
    try:
        while time.perf_counter() - started < 30:
            info = threads_info(server.url)
            if info and info["threads"] == info["max_threads"]:
                return round(time.perf_counter() - started, 1)
            time.sleep(0.1)
        return None
    finally:
        stop.set()
        worker.join()


# The in-kernel server: ``llama_lab.serve()`` in a process whose main thread, like a notebook cell, runs
# pure-Python work whenever the bench's flag file exists.
KERNEL = """
import os, sys, time, llama_lab
handle = llama_lab.serve(port=int(sys.argv[1]), log_level="warning")
flag = sys.argv[2]
while True:
    if os.path.exists(flag):
        total = 0
        for i in range(2_000_000):
            total += i * i
    else:
        time.sleep(0.05)
"""


def run_side(name: str, argv: list[str], env: dict[str, str], args: argparse.Namespace, cwd: str | None = None,
             cell_flag: Path | None = None) -> dict:
    server = ServerProcess(argv, env=env, startup_timeout_s=1200, cwd=cwd, name=name)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LLAMA_LAB_THREADS"):
        if key not in env:
            server.env.pop(key, None)
    logger.info("%s: starting %s", name, " ".join(server.argv))
    with server:
        try:
            model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            model = "default"
        stream_rate(server.url, model, 8, 60)  # warm-up
        out: dict = {"startup_s": round(server.startup_s, 1), "threads_at_start": threads_info(server.url)}
        for busy in (0, 1, 2):
            out[f"busy{busy}"] = measure(server, model, args, busy, cell_flag)
            logger.info("%s with %d busy: %s", name, busy, out[f"busy{busy}"])
    quiet = out["busy0"]["tok_s"]
    for busy in (1, 2):
        out[f"kept{busy}"] = round(out[f"busy{busy}"]["tok_s"] / quiet, 2) if quiet else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=20.0, help="cut a stream after this long and rate what it sent")
    ap.add_argument("--sides", default="auto,pinned,kernel", help="comma-separated: auto, pinned, kernel")
    ap.add_argument("--baseline", metavar="REF", help="also run the server as it was at this commit")
    ap.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server binary, for the peer")
    ap.add_argument("--gguf", help="GGUF for llama-server (default: the embedded model's)")
    ap.add_argument("--no-recovery", dest="recovery", action="store_false")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    cpus = len(os.sched_getaffinity(0))
    machine = cpu_kind()
    load_before = os.getloadavg()
    serve = ["{python}", "-m", "llama_lab", "serve", "--model", "default", "--port", "{port}", "--log-level", "warning"]
    # ours build the compiled step (once per model and machine) before serving, so that a first run does not
    # time the eager step beside a compile; the baseline predates the flag (it compiled before serving anyway)
    ours = [*serve, "--no-compile-in-background"]
    sides: dict[str, tuple[list[str], dict[str, str], str | None, Path | None]] = {}
    cell_flag = Path(tempfile.mkdtemp(prefix="contention-")) / "cell-busy"
    wanted = [s.strip() for s in args.sides.split(",") if s.strip()]
    if "auto" in wanted:
        sides["auto"] = (ours, {}, None, None)
    if "pinned" in wanted:
        sides[f"pinned --threads {cpus}"] = ([*ours, "--threads", str(cpus)], {}, None, None)
    if "kernel" in wanted:
        sides["in-kernel serve(), cell"] = (["{python}", "-c", KERNEL, "{port}", str(cell_flag)], {}, None, cell_flag)
    if args.baseline:
        tree = baseline_tree(args.baseline)
        cache = str(Path(tempfile.gettempdir()) / "llama_lab_bench" / f"cache-{args.baseline}")
        sides[f"baseline @{args.baseline}"] = (serve, {"PYTHONPATH": str(tree), "LLAMA_LAB_CACHE": cache}, str(tree), None)
    llama_server, why_not = find_llama_server(args.llama_server)
    if llama_server is not None:
        from llama_lab.model import embedded_gguf_path

        gguf = args.gguf or str(embedded_gguf_path())
        sides[f"llama.cpp -t {cpus}"] = ([str(llama_server), "-m", gguf, "--host", "127.0.0.1", "--port", "{port}",
                                          "-t", str(cpus)], peer_env(llama_server.parent), None, None)
    else:
        print(f"llama.cpp llama-server: skipped ({why_not})")

    results = {}
    for name, (argv, env, cwd, flag) in sides.items():
        try:
            results[name] = run_side(name, argv, env, args, cwd, flag)
        except Exception as exc:  # noqa: BLE001 - one side failing must not lose the others' figures
            logger.exception("%s failed", name)
            results[name] = {"error": str(exc)}
    load_after = os.getloadavg()

    print(f"\n{machine}; one greedy stream of {args.tokens} tokens, median of {args.repeats}; "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    header = f"{'side':<26} {'quiet':>7} {'1 busy':>7} {'2 busy':>7} {'kept 1':>7} {'kept 2':>7}  threads q/1/2  back s  others' CPU q/1/2"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<26} failed: {r['error']}")
            continue
        threads = "/".join(str(r[f"busy{b}"]["threads"][-1]) for b in (0, 1, 2))
        back = r["busy2"].get("back_to_max_s", "-")
        others = "/".join(f"{r[f'busy{b}']['others_cpu']:.2f}" for b in (0, 1, 2))
        print(f"{name:<26} {r['busy0']['tok_s']:>7} {r['busy1']['tok_s']:>7} {r['busy2']['tok_s']:>7} "
              f"{r['kept1']!s:>7} {r['kept2']!s:>7}  {threads:>13}  {back!s:>6}  {others}")
    auto = results.get("auto", {})
    for ref_name in [n for n in results if n.startswith(("pinned", "baseline"))]:
        ref = results[ref_name]
        if "busy0" in auto and "busy0" in ref and ref["busy0"]["tok_s"]:
            print(f"quiet speed, auto / {ref_name}: {auto['busy0']['tok_s'] / ref['busy0']['tok_s']:.2f}")
    print(json.dumps({"machine": machine, "tokens": args.tokens, "repeats": args.repeats,
                      "load_before": load_before[0], "load_after": load_after[0], "llama_server": why_not or str(llama_server),
                      "sides": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
