"""Engine vs raw ``model.generate``: load time, memory and single-stream decode speed per load mode.

    python bench/engine_bench.py [--modes full,8bit,4bit,cpu] [--tokens 128] [--repeats 3] [--model default]

Each mode runs in a fresh subprocess so its memory figures are its own. Both sides decode the
same prompt greedily for exactly ``--tokens`` tokens (eos ignored) in the same dtype, on the
same thread (``engine.call``); the figure is tokens / wall time including prefill, median of
the repeats, alternating the order.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to program computers."}]


def worker(model: str, mode: str, tokens: int, repeats: int) -> dict:
    import psutil
    import torch

    from llama_lab import load_model
    from llama_lab.engine import Engine, SamplingParams

    lm = load_model(model, mode)
    ids = lm.chat_prompt_ids(PROMPT)
    inp = torch.tensor([ids], device=lm.device)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    engine = Engine(lm)

    def run_engine() -> float:
        t = time.perf_counter()
        out = engine.generate(ids, params)
        assert out.completion_tokens == tokens, out.completion_tokens
        return tokens / (time.perf_counter() - t)

    def raw_generate() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            out = lm.model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=tokens,
                                    min_new_tokens=tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        assert out.shape[1] - len(ids) == tokens
        return tokens / (time.perf_counter() - t)

    def run_raw() -> float:
        # On the engine's own thread: torch keeps one OpenMP team per calling thread, and two
        # teams spinning on 2 cores slow both sides by ~40% (measured), which is not the engine.
        return engine.call(raw_generate).result()

    run_engine(), run_raw()  # warm-up
    eng, raw = [], []
    for i in range(repeats):
        order = (run_engine, run_raw) if i % 2 == 0 else (run_raw, run_engine)
        for fn in order:
            (eng if fn is run_engine else raw).append(fn())
    engine.close()
    return {"mode": mode, "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
            "load_s": round(lm.load_seconds, 2), "weights_mib": round(lm.weights_bytes / 2**20, 1),
            "rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1),
            "engine_tok_s": round(statistics.median(eng), 2), "raw_generate_tok_s": round(statistics.median(raw), 2),
            "ratio": round(statistics.median(eng) / statistics.median(raw), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--modes", default="full,8bit,4bit,cpu")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.worker, args.tokens, args.repeats)))
        return
    rows = []
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--worker", mode, "--model", args.model,
                              "--tokens", str(args.tokens), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    header = f"{'mode':<6} {'dtype':<9} {'load s':>7} {'weights MiB':>12} {'RSS MiB':>8} {'engine tok/s':>13} {'generate tok/s':>15} {'ratio':>6}"
    print(f"model={args.model} tokens={args.tokens} repeats={args.repeats} (median; single stream, greedy)")
    print(header)
    for r in rows:
        print(f"{r['mode']:<6} {r['dtype']:<9} {r['load_s']:>7} {r['weights_mib']:>12} {r['rss_mib']:>8} "
              f"{r['engine_tok_s']:>13} {r['raw_generate_tok_s']:>15} {r['ratio']:>6}")
    print(json.dumps({"bench": "engine", "model": args.model, "tokens": args.tokens, "rows": rows,
                      "min_ratio": min(r["ratio"] for r in rows)}))


if __name__ == "__main__":
    main()
