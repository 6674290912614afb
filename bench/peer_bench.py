"""llama_lab against llama.cpp's ``llama-server`` on the same GGUF file, in one run, one server at a time.

    python -m bench.peer_bench                          # the embedded SmolLM2 Q4_1 GGUF
    python -m bench.peer_bench --gguf model.gguf --repeats 3
    python -m bench.peer_bench --rounds 3 --repeats 1   # the servers take turns: ours, peer, ours, ...
    python -m bench.peer_bench --llama-cpp-bin DIR      # an existing llama.cpp build (DIR/llama-server)
    python -m bench.peer_bench --isa avx2               # both sides on their AVX2 code, on an AVX512 CPU
    python -m bench.peer_bench --isa avx512             # both on AVX512 + VNNI without BF16 (Ice Lake's set)

llama.cpp is built once into the llama_lab cache dir from the copy vendored in the ``llama-cpp-python``
sdist (``pip download --no-binary :all:``, then cmake ``-DGGML_NATIVE=ON -DLLAMA_CURL=OFF``; about 8
minutes on 2 cores). Both servers get greedy streamed chat requests with the same prompts, over HTTP:

- one stream: decode tok/s of a 128-token answer (first token to last), median of ``--repeats``;
- after a 4k prompt: the same, right after a fresh ~4,000-token prompt;
- TTFT of that 4k prompt, and of the next turn (the conversation so far plus one question): the conversation
  holds the answer as the model ends it, as a chat client sends it back. The timed 128-token answers use
  ``ignore_eos``, which the servers read differently (llama.cpp bans the end-of-turn token, we and vLLM generate
  it and go on), so their text past that token differs: ours lost the special token and its prefix cache
  matched only up to it, llama.cpp's matched to the end. A second, untimed request gets the natural answer;
- 16 streams: aggregate tok/s of 16 concurrent 64-token answers (llama-server runs ``-np 16``), the same 16
  prompts each repeat (both servers may reuse a prompt's cache: llama.cpp keeps each slot's last prompt, ours
  its prefix cache); then "16 new": 16 prompts neither has seen, so only their shared chat template can be reused;
- perplexity of ``llama_lab/lab/data/perplexity.txt`` in 512-token windows scored on their second
  half, as ``llama-perplexity -c 512`` scores them, ours computed by the same rule.

With ``--rounds R`` each server is started R times, in turns (ours, the peer, ours, ...), and each
figure is the median over its rounds: on a shared VM whose speed drifts by a third within minutes
(measured: one stream 66-107 tok/s for the same server in one hour), a slow spell then hits both
sides instead of whichever ran during it. The table adds each round's one-stream and 16-stream ratios.

With ``--isa avx2`` on an AVX512 CPU both sides run the code an AVX2-only CPU runs: llama.cpp is built
with ``-DGGML_NATIVE=OFF`` and AVX2/FMA/F16C/BMI2 (no AVX512), ours with ``LLAMA_LAB_KERNEL_CFLAGS=-mno-avx512f``
(the kernels' AVX2 loops), ``LLAMA_LAB_GEMM_DTYPE=fp32`` (no bf16 prompt GEMM) and ``ATEN_CPU_CAPABILITY=avx2``
(torch's and inductor's AVX2 code). The same instructions, not the same chip: an AVX2-only CPU has its own
caches and clocks, so this checks the AVX2 paths between real AVX2 runs, it does not replace them.
``--isa avx512`` on an AVX512-BF16 CPU does the same for the AVX512 CPUs without BF16 (Skylake-X to Ice Lake):
llama.cpp with AVX512, VBMI and VNNI but not BF16, ours with ``-mno-avx512bf16`` (its prompt product follows:
int16 tiles) and an fp16 KV cache (``LLAMA_LAB_KV_DTYPE=fp16``), what such a CPU gets by default.

It prints a table with our/peer ratios and the CPU kind, then one JSON line. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import httpx

from llama_lab.cache import cache_root
from llama_lab.kernels.build import cpu_flags
from llama_lab.profiling import cpu_kind
from llama_lab.web.launcher import ServerProcess, llama_lab_command

logger = logging.getLogger("peer_bench")

LONG_TOKENS = 4000
SIDES = ("llama_lab", "llama-server")
STORY = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper and a storm."}]


# ---------------------------------------------------------------- the peer

NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
ISAS = ("native", "avx2", "avx512")


def _ggml_isa_flags(avx512: bool) -> list[str]:
    """ggml's options for a build that runs one instruction set whatever this CPU has: AVX2 (with FMA, F16C, BMI2),
    and with ``avx512`` AVX512 with VBMI and VNNI (Ice Lake's set; Skylake-X and Cascade Lake have less); never
    AVX512-BF16, AVX-VNNI or AMX."""
    on = "ON" if avx512 else "OFF"
    return ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON",
            f"-DGGML_AVX512={on}", f"-DGGML_AVX512_VBMI={on}", f"-DGGML_AVX512_VNNI={on}", "-DGGML_AVX512_BF16=OFF",
            "-DGGML_AVX_VNNI=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


# ours on the same code: the kernels' AVX2 loops, the fp32 prompt GEMM, torch's and inductor's AVX2 code
AVX2_ENV = {"LLAMA_LAB_KERNEL_CFLAGS": "-mno-avx512f", "LLAMA_LAB_GEMM_DTYPE": "fp32", "ATEN_CPU_CAPABILITY": "avx2"}
# ... or the AVX512 loops without BF16, and the fp16 KV cache such a CPU gets
AVX512_ENV = {"LLAMA_LAB_KERNEL_CFLAGS": "-mno-avx512bf16", "LLAMA_LAB_KV_DTYPE": "fp16"}
ISA_ENV = {"native": {}, "avx2": AVX2_ENV, "avx512": AVX512_ENV}
ISA_CMAKE = {"avx2": _ggml_isa_flags(avx512=False), "avx512": _ggml_isa_flags(avx512=True)}
ISA_NAME = {"native": "", "avx2": " running AVX2 code only (--isa avx2)",
            "avx512": " running AVX512 + VNNI code without BF16 (--isa avx512)"}


def peer_dir(amx: bool = False, isa: str = "native") -> Path:
    """Where ``build_llama_cpp`` keeps its build on this CPU (other benches look for the peer there).

    ggml's AMX code (built by -march=native where the CPU lists amx_tile) faulted in this project's VMs: its
    first `tilezero` was an invalid opcode although the kernel granted the tile state. Without AMX the
    peer runs its AVX512/VNNI code, the same ISA as our kernels; amx=True builds it anyway. isa="avx2"
    and isa="avx512" are separate builds of the AVX2 code only and of AVX512 without BF16.
    """
    if isa in ISA_CMAKE:
        return cache_root() / "peers" / f"llama.cpp-{isa}"
    no_amx = not amx and "amx_tile" in cpu_flags()
    return cache_root() / "peers" / ("llama.cpp-noamx" if no_amx else "llama.cpp")


def peer_env(bin_dir: Path) -> dict[str, str]:
    """The environment a built llama.cpp binary needs: its shared libraries lie beside it."""
    return {"LD_LIBRARY_PATH": str(bin_dir)}


def build_llama_cpp(explicit: str | None, amx: bool = False, isa: str = "native") -> Path:
    """A directory holding ``llama-server`` and ``llama-perplexity``: given, cached, or built now."""
    if explicit:
        return Path(explicit)
    target = peer_dir(amx, isa)
    no_amx = target.name.endswith("-noamx")
    if (target / "llama-server").is_file() and (target / "llama-perplexity").is_file():
        return target
    work = Path(tempfile.mkdtemp(prefix="llama-cpp-build-"))
    try:
        logger.info("building llama.cpp's llama-server once (about 8 minutes on 2 cores) in %s", work)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "llama-cpp-python", "-d", str(work)], check=True, capture_output=True)
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        if isa in ISA_CMAKE:
            flags = ISA_CMAKE[isa]
        else:
            flags = ["-DGGML_NATIVE=ON"] + (["-DCMAKE_C_FLAGS=" + NO_AMX, "-DCMAKE_CXX_FLAGS=" + NO_AMX] if no_amx else [])
        subprocess.run(["cmake", "-B", "build", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release", *flags],
                       cwd=src, check=True, capture_output=True)
        subprocess.run(["cmake", "--build", "build", "-j", str(os.cpu_count() or 2), "--target", "llama-server",
                        "llama-perplexity"], cwd=src, check=True, capture_output=True)
        target.mkdir(parents=True, exist_ok=True)
        for exe in ("llama-server", "llama-perplexity"):
            shutil.copy2(src / "build" / "bin" / exe, target / exe)
        for lib in (src / "build" / "bin").glob("*.so*"):
            shutil.copy2(lib, target / lib.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


# ---------------------------------------------------------------- requests

async def stream_chat(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int,
                      ignore_eos: bool = True) -> dict:
    """One greedy streamed chat: time to first token, decode tok/s after it, the text.

    A kept-alive connection that the server closed as the request went out (cpp-httplib, under
    llama-server, closes idle ones on its own clock) is retried once on a new connection.
    """
    try:
        return await _stream_chat(client, url, messages, max_tokens, ignore_eos)
    except httpx.RemoteProtocolError as exc:
        logger.warning("%s: %s; retrying once on a new connection", url, exc)
        return await _stream_chat(client, url, messages, max_tokens, ignore_eos)


async def _stream_chat(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int,
                       ignore_eos: bool) -> dict:
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": ignore_eos}
    started = time.perf_counter()
    first = last = None
    chunks = 0
    text = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta", {})
            if delta.get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
                text.append(delta["content"])
    answer = "".join(text)
    usage_tokens = chunks  # both servers send one chunk per token here (no stop strings, greedy)
    tok_s = (usage_tokens - 1) / (last - first) if first and last and last > first else float("nan")
    return {"ttft": (first or time.perf_counter()) - started, "tok_s": tok_s, "tokens": usage_tokens, "text": answer}


def long_prompt(tokenizer, target: int, salt: str) -> str:
    base = files("llama_lab.lab").joinpath("data/perplexity.txt").read_text()
    text = salt + "\n"
    while len(tokenizer.encode(text)) < target:
        text += base
    ids = tokenizer.encode(text)[:target]
    return tokenizer.decode(ids) + "\n\nSummarize the text above in a few sentences."


async def bench_server(url: str, tokenizer, repeats: int) -> dict:
    out: dict = {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
        await stream_chat(client, url, STORY, 16)  # warm-up
        singles = [(await stream_chat(client, url, STORY, 128))["tok_s"] for _ in range(repeats)]
        out["single_tok_s"] = statistics.median(singles)
        longs, ttfts, nexts = [], [], []
        for i in range(repeats):
            messages = [{"role": "user", "content": long_prompt(tokenizer, LONG_TOKENS, f"Document {time.time_ns()}-{i}.")}]
            first = await stream_chat(client, url, messages, 128)
            longs.append(first["tok_s"])
            ttfts.append(first["ttft"])
            reply = await stream_chat(client, url, messages, 128, ignore_eos=False)  # untimed: see the module doc
            follow = messages + [{"role": "assistant", "content": reply["text"]},
                                 {"role": "user", "content": "Now give it a title."}]
            nexts.append((await stream_chat(client, url, follow, 16))["ttft"])
        out["long_tok_s"], out["ttft_4k_s"], out["next_turn_ttft_s"] = (statistics.median(longs),
                                                                       statistics.median(ttfts),
                                                                       statistics.median(nexts))
        for key, fresh in (("x16_tok_s", False), ("x16_new_tok_s", True)):
            aggs = []
            for _ in range(repeats):
                # the same 16 prompts every time (either server may keep them), or prompts never seen before
                lead = [f"Story {i}" + (f", take {time.time_ns()}" if fresh else "") + ": " for i in range(16)]
                started = time.perf_counter()
                results = await asyncio.gather(*[stream_chat(client, url, [{"role": "user", "content": lead[i]
                                                                             + STORY[0]["content"]}], 64)
                                                 for i in range(16)])
                aggs.append(sum(r["tokens"] for r in results) / (time.perf_counter() - started))
            out[key] = statistics.median(aggs)
    return out


# ---------------------------------------------------------------- perplexity

def our_perplexity(gguf: Path, ctx: int = 512) -> tuple[float, int]:
    """llama-perplexity's rule: windows of ``ctx`` tokens, each scored on its second half."""
    import torch

    from llama_lab import load_model

    lm = load_model(str(gguf))
    text = files("llama_lab.lab").joinpath("data/perplexity.txt").read_text()
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < 2 * ctx:
        ids = ids + ids
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - ctx + 1, ctx):
            window = torch.tensor([ids[start:start + ctx]])
            logp = torch.log_softmax(lm.model(window).logits[0].float(), dim=-1)
            for i in range(ctx // 2, ctx - 1):
                nll -= float(logp[i, window[0, i + 1]])
                count += 1
    return math.exp(nll / count), count


def peer_perplexity(bin_dir: Path, gguf: Path, threads: int, ctx: int = 512) -> float | None:
    text = files("llama_lab.lab").joinpath("data/perplexity.txt").read_text()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text * max(1, math.ceil(4 * ctx / max(1, len(text.split())))))
    try:
        done = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", f.name, "-c", str(ctx),
                               "-t", str(threads), "-b", str(ctx)], capture_output=True, text=True, timeout=1800,
                              env={**os.environ, **peer_env(bin_dir)})
    finally:
        os.unlink(f.name)
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    return float(match.group(1)) if match else None


# ---------------------------------------------------------------- main

def run_side(name: str, argv: list[str], env: dict[str, str], tokenizer, repeats: int) -> dict:
    server = ServerProcess(argv, env=env, startup_timeout_s=1800, name=name)
    started = time.perf_counter()
    server.start()
    ready = time.perf_counter() - started
    try:
        result = asyncio.run(bench_server(server.url, tokenizer, repeats))
        result["ready_s"] = ready
        result["rss_mb"] = server.rss() / 2**20
    except Exception:
        logger.error("%s failed; its last output:\n%s", name, server.log(60))
        raise
    finally:
        server.stop()
    logger.info("%s: %s", name, result)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="GGUF file (default: the embedded SmolLM2 Q4_1)")
    ap.add_argument("--llama-cpp-bin", help="directory with llama-server and llama-perplexity (default: build once)")
    ap.add_argument("--llama-cpp-amx", action="store_true", help="build llama.cpp with its AMX code where the CPU has AMX")
    ap.add_argument("--isa", choices=ISAS, default="native",
                    help="avx2: both sides run their AVX2 code (llama.cpp built without AVX512, ours told to); "
                         "avx512: AVX512 and VNNI without BF16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeats", type=int, default=3, help="measurements of each kind per server start")
    ap.add_argument("--rounds", type=int, default=1, help="server starts per side, in turns (medians over rounds)")
    ap.add_argument("--skip-perplexity", action="store_true")
    ap.add_argument("--sides", default="llama_lab,llama-server", help="comma-separated: llama_lab, llama-server")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        ap.error("--rounds and --repeats must be at least 1")
    names = [name.strip() for name in args.sides.split(",") if name.strip()]
    unknown = [name for name in names if name not in SIDES]
    if unknown or not names:
        ap.error(f"--sides: unknown side(s) {', '.join(unknown) or '(none)'} (choose from {', '.join(SIDES)})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from transformers import AutoTokenizer

    from llama_lab.model.gguf_native import ensure_packed
    from llama_lab.model.loading import embedded_gguf_path

    gguf = Path(args.gguf) if args.gguf else embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(ensure_packed(gguf))
    bin_dir = build_llama_cpp(args.llama_cpp_bin, amx=args.llama_cpp_amx, isa=args.isa)
    ours_env = ISA_ENV[args.isa]
    ctx = LONG_TOKENS + 1024
    commands = {
        # the compiled step is built (once per model and machine) before serving: steady state is timed
        "llama_lab": (llama_lab_command("serve", "--model", str(gguf), "--log-level", "warning",
                                        "--no-compile-in-background"), ours_env),
        "llama-server": ([str(bin_dir / "llama-server"), "-m", str(gguf), "--port", "{port}", "--host", "127.0.0.1",
                          "-t", str(args.threads), "-np", "16", "-c", str(16 * ctx)], peer_env(bin_dir)),
    }
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            rounds[name].append(run_side(name, *commands[name], tokenizer, args.repeats))
    sides = {name: {key: statistics.median(r[key] for r in results) for key in results[0]}
             for name, results in rounds.items()}
    if not args.skip_perplexity:
        if "llama_lab" in sides:  # the reference product, the same on every ISA
            sides["llama_lab"]["perplexity"] = our_perplexity(gguf)[0]
        if "llama-server" in sides:
            sides["llama-server"]["perplexity"] = peer_perplexity(bin_dir, gguf, args.threads)
    ours, peer = sides.get("llama_lab", {}), sides.get("llama-server", {})
    ratio = {k: ours[k] / peer[k] for k in ("single_tok_s", "long_tok_s", "x16_tok_s", "x16_new_tok_s", "ttft_4k_s",
                                           "next_turn_ttft_s", "perplexity") if ours.get(k) and peer.get(k)}
    isa = ISA_NAME[args.isa]
    print(f"\n{gguf.name} on {cpu_kind()}{isa}; greedy, streamed over HTTP, {args.repeats} repeats x {args.rounds} "
          "round(s) (medians)\n")
    cols = [("single_tok_s", "one stream tok/s"), ("long_tok_s", "after 4k tok/s"), ("ttft_4k_s", "TTFT 4k s"),
            ("next_turn_ttft_s", "next turn TTFT s"), ("x16_tok_s", "16 streams tok/s"),
            ("x16_new_tok_s", "16 new prompts tok/s"), ("perplexity", "perplexity"),
            ("ready_s", "start to ready s"), ("rss_mb", "RSS MB")]
    print("| side | " + " | ".join(c[1] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, res in sides.items():
        print(f"| {name} | " + " | ".join(f"{res[k]:.3g}" if isinstance(res.get(k), float) else "-" for k, _ in cols) + " |")
    print("| ratio (ours / peer) | " + " | ".join(f"{ratio[k]:.2f}" if k in ratio else "-" for k, _ in cols) + " |")
    per_round = {}
    if args.rounds > 1 and len(names) == 2:
        per_round = {k: [a[k] / b[k] for a, b in zip(rounds["llama_lab"], rounds["llama-server"])]
                     for k in ("single_tok_s", "x16_tok_s", "x16_new_tok_s")}
        print("\nratio per round (ours then the peer, in turns): " + "; ".join(
            f"{label} {', '.join(f'{r:.2f}' for r in per_round[key])} (median {statistics.median(per_round[key]):.2f})"
            for key, label in (("single_tok_s", "one stream"), ("x16_tok_s", "16 streams"),
                               ("x16_new_tok_s", "16 new prompts"))))
    print(json.dumps({"gguf": gguf.name, "cpu": cpu_kind(), "isa": args.isa, "rounds": args.rounds, "sides": sides, "ratio": ratio,
                      "ratio_per_round": per_round}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
