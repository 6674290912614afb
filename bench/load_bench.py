"""One model in one load mode on this machine: load time, weights, peak and final RSS, one-stream speed.

    python -m bench.load_bench --model random:llama-3-8b --mode int4      # the 8B row of the README
    python -m bench.load_bench --model default --mode gguf --compile

The peak is the process's high-water RSS (``ru_maxrss``) across the load and the decode, so a load
that briefly holds the weights twice shows here. The decode is greedy, one stream, after a two-token
warm-up of the same shapes; the CPU and the load average are printed beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import psutil

from llama_lab.profiling import cpu_kind


def _gib(n: float) -> float:
    return round(n / 2**30, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama-3-8b")
    ap.add_argument("--mode", default="int4")
    ap.add_argument("--tokens", type=int, default=16, help="tokens timed after the warm-up")
    ap.add_argument("--compile", action="store_true", help="compile the decode step (default: eager)")
    args = ap.parse_args()
    if args.tokens < 1:
        ap.error("--tokens: must be at least 1")

    from llama_lab import load_model
    from llama_lab.engine import Engine, SamplingParams

    started = time.perf_counter()
    lm = load_model(args.model, args.mode)
    load_s = time.perf_counter() - started
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with Engine(lm, compile=args.compile, max_batch_size=1) as engine:
        ids = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog")
        engine.generate(ids, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        t0 = time.perf_counter()
        out = engine.generate(ids, SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True))
        seconds = time.perf_counter() - t0
        decode = engine.describe().get("decode")
    result = {"model": args.model, "mode": lm.mode.value, "weights_format": lm.weights_format,
              "load_s": round(load_s, 1), "weights_gib": _gib(lm.weights_bytes), "peak_rss_after_load_gib": _gib(peak_load),
              "peak_rss_gib": _gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
              "rss_now_gib": _gib(psutil.Process().memory_info().rss), "decode": decode,
              "tok_s": round(len(out.token_ids) / seconds, 2), "tokens": len(out.token_ids), "prompt_tokens": len(ids),
              "cpu": cpu_kind(), "loadavg_1m": os.getloadavg()[0]}
    print(f"{args.model} {result['mode']}: load {result['load_s']} s, weights {result['weights_gib']} GiB, "
          f"peak RSS {result['peak_rss_gib']} GiB, {result['tok_s']} tok/s one stream ({decode}); "
          f"{result['cpu']}, load average {result['loadavg_1m']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
