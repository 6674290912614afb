"""Decode speed of the engine against raw ``model.generate`` and the previous engine, in one run.

    python -m bench.engine_bench                    # embedded SmolLM2, bf16: all sides, every sweep
    python -m bench.engine_bench --quick            # shorter sweeps (a few minutes)
    python -m bench.engine_bench --model random:llama-3-8b --impls raw,eager,compiled   # on a GPU

Sides (each in a fresh process, same model, dtype and thread count):
  raw       Hugging Face ``model.generate`` (greedy, eos ignored; batches left-padded)
  hf-cb     transformers' own continuous batching (``model.generate_batch``, paged cache): the
            library we would otherwise build on
  previous  the engine as it was at ``--baseline-ref`` (a DynamicCache grown by concatenation),
            checked out of this repository's history with ``git archive``
  eager     this engine, ``compile=False``
  compiled  this engine, ``compile=True`` (warm-up/compile time reported)

Figures: single-stream decode tokens/s after the first token at each ``--contexts`` prompt length
(median of ``--repeats`` taken round-robin over the lengths, after a warm-up request at each), the time to first token of a
``--ttft-tokens`` prompt that shares no prefix with the earlier ones, the time to first token of the
next turn of that conversation (the same prompt plus a short question: a chat client sends the whole
history again; prefix caching computes only the new tokens), and the aggregate tokens/s of
``--batches`` concurrent requests. The table ends with the ratios the engine's bar is about; the last
stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

TEXT = ("The lighthouse keeper climbed the spiral stairs every evening, counting the steps, listening to the sea "
        "and writing down what the ships carried past the rocks. ")
BATCH_TOPICS = ["a dragon", "a river", "a robot", "a garden", "a storm", "a library", "a violin", "a desert"]


# ---------------------------------------------------------------- the worker (one side, one process)

def _prompt_of(tokenizer, n: int, lead: str = "") -> list[int]:
    ids = tokenizer.encode(lead + TEXT * (n // 20 + 2))
    return ids[:n]


def worker(args: argparse.Namespace) -> dict:
    import torch

    from llama_lab import load_model
    from llama_lab.engine import Engine, SamplingParams

    lm = load_model(args.model, args.mode)
    tok = lm.tokenizer
    out: dict = {"impl": args.worker, "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
                 "threads": torch.get_num_threads()}
    engine = None
    if args.worker in ("eager", "compiled"):
        t0 = time.perf_counter()
        engine = Engine(lm, max_batch_size=max(args.batches), max_active=1024, compile=args.worker == "compiled")
        out["warmup_s"] = round(time.perf_counter() - t0, 1)
        out["engine"] = engine.describe()
    elif args.worker == "previous":
        engine = Engine(lm, max_batch_size=max(args.batches), max_active=1024)

    def greedy(n: int) -> "SamplingParams":
        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    def on_model_thread(fn):
        # torch keeps one OpenMP team per calling thread; run raw generate where the engine would
        return engine.call(fn).result() if engine is not None else fn()

    def raw_generate(prompts: list[list[int]], n: int) -> float:
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=lm.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=lm.device)
        t = time.perf_counter()
        with torch.inference_mode():
            lm.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=pad)
        return time.perf_counter() - t

    def hf_batch(prompts: list[list[int]], n: int, timestamps: bool = False):
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0)
        t = time.perf_counter()
        done = lm.model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False, warmup=False,
                                       record_timestamps=timestamps)
        wall = time.perf_counter() - t
        assert all(len(o.generated_tokens) == n for o in done.values())
        return (wall, list(done.values())) if timestamps else wall

    def single(n_ctx: int, n: int, prompt: list[int] | None = None) -> tuple[float, float]:
        """(decode tok/s after the first token, time to first token)."""
        prompt = prompt or _prompt_of(tok, n_ctx)
        if args.worker == "hf-cb":  # per-token timestamps: the manager's start-up is not decoding
            _, (o,) = hf_batch([prompt], n, timestamps=True)
            return (n - 1) / (o.timestamps[-1] - o.timestamps[0]), o.timestamps[0] - o.created_time
        if args.worker == "raw":
            first = raw_generate([prompt], 1)
            total = raw_generate([prompt], n)
            return (n - 1) / max(total - first, 1e-9), first
        res = engine.generate(prompt, greedy(n))
        assert res.completion_tokens == n, res.completion_tokens
        return (n - 1) / (res.total_s - res.first_token_s), res.first_token_s

    if args.worker == "hf-cb":
        from transformers import GenerationConfig

        lm.model.generate_batch(inputs=[_prompt_of(tok, 16)], progress_bar=False, warmup=True,
                                generation_config=GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=-1,
                                                                   pad_token_id=0))
    for n_ctx in args.contexts:
        single(n_ctx, 4)  # warm-up at this length
    # Round-robin over the contexts, so a slow spell of a shared machine hits every length alike
    # and the long/short ratio stays a same-conditions comparison.
    rates: dict[int, list[float]] = {n_ctx: [] for n_ctx in args.contexts}
    for _ in range(args.repeats):
        for n_ctx in args.contexts:
            rates[n_ctx].append(single(n_ctx, args.tokens)[0])
    contexts = {str(n_ctx): {"tok_s": round(statistics.median(r), 2), "spread": [round(min(r), 2), round(max(r), 2)]}
                for n_ctx, r in rates.items()}
    out["contexts"] = contexts
    if args.ttft_tokens:
        first = _prompt_of(tok, args.ttft_tokens, lead="A new conversation. ")  # no prefix seen before
        out["ttft_s"] = round(single(0, 2, first)[1], 2)
        out["ttft_next_turn_s"] = round(single(0, 2, first + tok.encode(" So what did the keeper see that night?"))[1], 2)

    batches = {}
    for b in args.batches:
        prompts = [tok.encode(f"Write a long story about {BATCH_TOPICS[i % len(BATCH_TOPICS)]} number {i}.")
                   for i in range(b)]
        n = args.batch_tokens
        if args.worker == "raw":
            on_model_thread(lambda: raw_generate(prompts[:1], 2))
            wall = on_model_thread(lambda: raw_generate(prompts, n))
        elif args.worker == "hf-cb":  # from the first request's arrival to the last token (manager start-up excluded)
            hf_batch(prompts[:1], 2)
            _, outs = hf_batch(prompts, n, timestamps=True)
            wall = max(o.timestamps[-1] for o in outs) - min(o.created_time for o in outs)
        else:
            engine.generate(prompts[0], greedy(2))
            results: list = [None] * b
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, engine.generate(prompts[i], greedy(n))))
                       for i in range(b)]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t
            assert all(r.completion_tokens == n for r in results)
        batches[str(b)] = round(b * n / wall, 1)
    out["batches"] = batches
    if engine is not None:
        engine.close()
    return out


# ---------------------------------------------------------------- the driver

def run_side(impl: str, args: argparse.Namespace, argv: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    from bench._servers import baseline_tree  # here, not at the top: the worker runs by path, without ``bench``

    cwd = None
    if impl == "previous":
        tree = baseline_tree(args.baseline_ref)
        env["PYTHONPATH"] = str(tree)
        cwd = str(tree)
    # The worker runs this file by path, not with -m: no working directory is put first on sys.path,
    # so PYTHONPATH alone decides which llama_lab it imports (the previous side's tree, or the package).
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", impl, *argv],
                          capture_output=True, text=True, env=env, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def report(rows: dict[str, dict], args: argparse.Namespace) -> dict:
    ctx = [str(c) for c in args.contexts]
    bat = [str(b) for b in args.batches]
    head = (f"{'side':<10}{'warm-up s':>10}" + "".join(f"{'ctx ' + c:>11}" for c in ctx) + f"{'long/short':>11}"
            + (f"{'TTFT ' + str(args.ttft_tokens):>11}{'next turn':>11}" if args.ttft_tokens else "")
            + "".join(f"{'x' + b + ' agg':>10}" for b in bat))
    print(f"model={args.model} mode={args.mode}; single stream: decode tok/s after the first token "
          f"(median of {args.repeats}, {args.tokens} tokens); batches: aggregate tok/s, {args.batch_tokens} tokens each")
    print(head)
    for name, r in rows.items():
        tok = [r["contexts"][c]["tok_s"] for c in ctx]
        package = (r.get("engine") or {}).get("compiled_package")
        warm = f"{r.get('warmup_s', '-')}" + ("" if not package else (" L" if package["reused"] else " B"))
        line = f"{name:<10}{warm:>10}" + "".join(f"{t:>11}" for t in tok)
        line += f"{round(tok[-1] / tok[0], 2):>11}"
        if args.ttft_tokens:
            line += f"{r.get('ttft_s', '-')!s:>11}{r.get('ttft_next_turn_s', '-')!s:>11}"
        line += "".join(f"{r['batches'][b]:>10}" for b in bat)
        print(line)
    if any((r.get("engine") or {}).get("compiled_package") for r in rows.values()):
        print("warm-up: B = the compiled step was built (first start on this machine), L = loaded from its package")
    best = "compiled" if "compiled" in rows else ("eager" if "eager" in rows else None)
    summary: dict = {}
    if best:
        me = rows[best]
        for peer in ("raw", "hf-cb", "previous"):
            if peer in rows:
                p = rows[peer]
                summary[f"{best}_vs_{peer}"] = {
                    "single_by_context": {c: ratio(me["contexts"][c]["tok_s"], p["contexts"][c]["tok_s"]) for c in ctx},
                    "batch_aggregate": {b: ratio(me["batches"][b], p["batches"][b]) for b in bat},
                    "ttft": ratio(p.get("ttft_s"), me.get("ttft_s")),  # > 1: ours is faster
                    "ttft_next_turn": ratio(p.get("ttft_next_turn_s"), me.get("ttft_next_turn_s")),
                }
        summary[f"{best}_long_vs_short"] = ratio(me["contexts"][ctx[-1]]["tok_s"], me["contexts"][ctx[0]]["tok_s"])
        print("ratios:", json.dumps(summary))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--mode", default="full")
    ap.add_argument("--impls", default="raw,hf-cb,previous,eager,compiled")
    ap.add_argument("--contexts", default="10,1000,4000")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per single-stream run")
    ap.add_argument("--batch-tokens", type=int, default=64, help="tokens per request in the batch sweep")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ttft-tokens", type=int, default=6000, help="prompt length for the time-to-first-token figure (0: skip)")
    ap.add_argument("--baseline-ref", default="2c15f58", help="git ref of the previous engine")
    ap.add_argument("--quick", action="store_true", help="contexts 10,1000; batches 1,16; 64 tokens; 1 repeat; TTFT 2000")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.contexts, args.batches, args.tokens, args.repeats = "10,1000", "1,16", 64, 1
        args.ttft_tokens = min(args.ttft_tokens, 2000)
    argv = ["--model", args.model, "--mode", args.mode, "--contexts", args.contexts, "--batches", args.batches,
            "--tokens", str(args.tokens), "--batch-tokens", str(args.batch_tokens), "--repeats", str(args.repeats),
            "--ttft-tokens", str(args.ttft_tokens)]
    args.contexts = [int(c) for c in str(args.contexts).split(",")]
    args.batches = [int(b) for b in str(args.batches).split(",")]
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = {}
    for impl in args.impls.split(","):
        started = time.perf_counter()
        rows[impl] = run_side(impl, args, argv)
        # each side's row as soon as it is done: a run stopped at a time limit still reports the finished ones
        print(f"  {impl}: done in {time.perf_counter() - started:.0f} s: {json.dumps(rows[impl])}", file=sys.stderr)
    summary = report(rows, args)
    print(json.dumps({"bench": "engine", "model": args.model, "mode": args.mode, "rows": rows, "summary": summary}))


if __name__ == "__main__":
    main()
