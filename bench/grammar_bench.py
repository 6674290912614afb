"""Grammar-constrained decoding on this machine: which library, and what a constrained row costs.

Measures, on the embedded SmolLM2's tokenizer (49,152 tokens), for each candidate library that is
importable (``xgrammar``, ``llguidance``, ``outlines-core``; put a candidate on ``PYTHONPATH`` to
include it): the one-off tokenizer preparation, the compile time of a nested JSON schema (cold)
and of a tool-call schema, and the host time to fill the token bitmasks of 8 constrained rows and
advance them by one token (what the engine thread pays per decode step). Then, library-neutral,
the cost of applying 8 rows' bitmasks to a ``[16, V]`` logits batch with ``sampling.apply_bitmask``.
With ``--engine`` it also times a batch of 16 on the tiny model, 8 constrained and 8 free, against
16 free rows (the issue's ≥ 0.9x bar for the free rows).

    python bench/grammar_bench.py [--steps 64] [--engine]

Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any, Callable

from llama_lab.profiling import cpu_kind

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "status": {"type": "string", "enum": ["active", "inactive", "pending"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "scores": {"type": "array", "items": {"type": "number"}},
    },
    "required": ["name", "age", "tags", "status", "address"],
    "additionalProperties": False,
}
TOOL = {
    "type": "object",
    "properties": {"name": {"const": "get_weather"},
                   "arguments": {"type": "object", "properties": {"city": {"type": "string"},
                                                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                                 "required": ["city"], "additionalProperties": False}},
    "required": ["name", "arguments"], "additionalProperties": False,
}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


# ---------------------------------------------------------------- adapters: prepare, compile, matcher ops


def xgrammar_side(tokenizer: Any) -> dict[str, Any]:
    import torch
    import xgrammar as xgr

    info, prep = timed(lambda: xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer)))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    vocab = len(tokenizer)

    def compile_(schema: dict) -> Any:
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)

    def matcher(compiled: Any) -> Any:
        return xgr.GrammarMatcher(compiled)

    def fill(m: Any, mask: torch.Tensor, i: int) -> None:
        m.fill_next_token_bitmask(mask, i)

    return {"prep": prep, "compile": compile_, "matcher": matcher, "fill": fill,
            "accept": lambda m, t: m.accept_token(t), "done": lambda m: m.is_terminated(), "vocab": vocab}


def llguidance_side(tokenizer: Any) -> dict[str, Any]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    tok, prep = timed(lambda: llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer)))

    def compile_(schema: dict) -> Any:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})
        m = llguidance.LLMatcher(tok, grammar)  # llguidance compiles lazily: the first matcher pays
        assert not m.is_error(), m.get_error()
        return grammar

    return {"prep": prep, "compile": compile_, "matcher": lambda g: llguidance.LLMatcher(tok, g),
            "fill": lambda m, mask, i: llguidance.torch.fill_next_token_bitmask(m, mask, i),
            "accept": lambda m, t: m.consume_token(t), "done": lambda m: m.is_stopped(), "vocab": len(tokenizer)}


def outlines_side(tokenizer: Any) -> dict[str, Any]:
    import outlines_core as oc

    def bytes_to_unicode() -> dict[int, str]:
        """GPT-2's byte <-> printable character table (byte-level BPE vocabularies are written in it)."""
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        return dict(zip(bs, map(chr, cs)))

    def vocabulary() -> Any:
        decoder = {c: b for b, c in bytes_to_unicode().items()}
        eos = tokenizer.eos_token_id
        mapping: dict[bytes, list[int]] = {}
        for token, tid in tokenizer.get_vocab().items():
            if tid == eos or tid in tokenizer.all_special_ids:
                continue
            try:
                raw = bytes(decoder[c] for c in token)
            except KeyError:
                raw = token.encode()
            mapping.setdefault(raw, []).append(tid)
        return oc.Vocabulary(eos, mapping)

    vocab_obj, prep = timed(vocabulary)

    def compile_(schema: dict) -> Any:
        return oc.Index(oc.json_schema.build_regex_from_schema(json.dumps(schema)), vocab_obj)

    def fill(g: Any, mask: Any, i: int) -> None:
        row = mask[i]
        g.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    def accept(g: Any, t: int) -> None:
        if not g.is_finished():
            g.advance(t)

    return {"prep": prep, "compile": compile_, "matcher": lambda idx: oc.Guide(idx), "fill": fill,
            "accept": accept, "done": lambda g: g.is_finished(), "vocab": len(tokenizer)}


SIDES = {"xgrammar": xgrammar_side, "llguidance": llguidance_side, "outlines-core": outlines_side}


def allowed(mask_row: Any, vocab: int) -> list[int]:
    import torch

    bits = (mask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return [t for t in bits.flatten().nonzero().flatten().tolist() if t < vocab]


def run_side(name: str, tokenizer: Any, steps: int, rows: int = 8) -> dict[str, Any]:
    import torch

    side = SIDES[name](tokenizer)
    compiled, compile_s = timed(lambda: side["compile"](NESTED))
    _, tool_s = timed(lambda: side["compile"](TOOL))
    vocab = side["vocab"]
    mask = torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)
    rng = random.Random(0)
    matchers = [side["matcher"](compiled) for _ in range(rows)]
    per_step, walk_tokens = [], 0
    for _ in range(steps):
        # a random walk among the allowed tokens (the model's choice is irrelevant to the cost)
        t0 = time.perf_counter()
        for i, m in enumerate(matchers):
            side["fill"](m, mask, i)
        fill_s = time.perf_counter() - t0
        choices = []
        for i in range(rows):
            ok = allowed(mask[i], vocab)
            choices.append(rng.choice(ok) if ok else tokenizer.eos_token_id)
        t1 = time.perf_counter()
        for i, m in enumerate(matchers):
            if side["done"](m):
                matchers[i] = side["matcher"](compiled)
            else:
                side["accept"](m, choices[i])
                walk_tokens += 1
        per_step.append(fill_s + time.perf_counter() - t1)
    return {"library": name, "prepare_s": side["prep"], "compile_nested_ms": compile_s * 1e3,
            "compile_tool_ms": tool_s * 1e3, "step_8_rows_ms_median": statistics.median(per_step) * 1e3,
            "step_8_rows_ms_p90": sorted(per_step)[int(0.9 * len(per_step))] * 1e3, "tokens": walk_tokens}


def apply_cost(vocab: int, reps: int = 200) -> dict[str, float]:
    """The on-device part, library-neutral: ``sampling.apply_bitmask`` on 8 of 16 rows (the CPU operator
    the engine uses, and the torch ops it replaced), for random masks (half the bits set: the worst
    case) and a grammar-like one (a few words with allowed tokens)."""
    import torch

    from llama_lab import kernels
    from llama_lab.engine.sampling import _apply_bitmask_torch, apply_bitmask

    operator = kernels.load() is None
    logits = torch.randn(16, vocab)
    words = (vocab + 31) // 32
    random_mask = torch.randint(-(2**31), 2**31 - 1, (8, words), dtype=torch.int32)
    sparse_mask = torch.zeros(8, words, dtype=torch.int32)
    sparse_mask[:, ::997] = 0x0F0F0F0F
    rows = torch.arange(0, 16, 2)

    def median_ms(fn, mask) -> float:
        for _ in range(10):
            fn(logits.clone(), mask, rows)
        out = []
        for _ in range(reps):
            x = logits.clone()
            t = time.perf_counter()
            fn(x, mask, rows)
            out.append(time.perf_counter() - t)
        return statistics.median(out) * 1e3

    result = {"apply_8_of_16_ms_median": median_ms(apply_bitmask, random_mask),
              "apply_8_of_16_sparse_ms_median": median_ms(apply_bitmask, sparse_mask),
              "torch_ops_8_of_16_ms_median": median_ms(_apply_bitmask_torch, random_mask),
              "cpu_operator": operator}
    return result


def engine_batch(tokens: int = 48) -> dict[str, float]:
    """Tiny model, 16 concurrent requests: all free, then 8 constrained + 8 free; free rows' tok/s."""
    import threading

    from llama_lab import load_model
    from llama_lab.engine import Engine, SamplingParams
    from llama_lab.engine.grammar import GrammarCompiler, GrammarSpec

    loaded = load_model("random:tiny")
    engine = Engine(loaded, max_batch_size=16, compile=False)
    compiler = GrammarCompiler(loaded.tokenizer, loaded.stop_token_ids)
    grammar = compiler.compile(GrammarSpec.json_schema(NESTED))
    prompt = loaded.tokenizer.encode("Describe a person as JSON.")

    def run(constrained: int) -> float:
        free_tokens, free_time = [0], [0.0]
        lock = threading.Lock()

        def one(i: int) -> None:
            p = SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=i >= constrained,
                               grammar=grammar if i < constrained else None)
            t = time.perf_counter()
            c = engine.generate(prompt, p)
            if i >= constrained:
                with lock:
                    free_tokens[0] += c.completion_tokens
                    free_time[0] += time.perf_counter() - t
        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return free_tokens[0] / free_time[0]

    run(0)
    free = [run(0) for _ in range(3)]
    mixed = [run(8) for _ in range(3)]
    engine.close()
    return {"free_rows_tok_s_all_free": statistics.median(free), "free_rows_tok_s_mixed": statistics.median(mixed),
            "ratio": statistics.median(mixed) / statistics.median(free)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--engine", action="store_true", help="also time the mixed batch on the tiny model")
    parser.add_argument("--libraries", default=",".join(SIDES))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from llama_lab.model.loading import shipped_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(shipped_tokenizer_dir())
    results = []
    for name in args.libraries.split(","):
        try:
            results.append(run_side(name, tokenizer, args.steps))
        except ImportError as exc:
            print(f"{name}: not installed ({exc})")
    print(f"CPU: {cpu_kind()}; tokenizer: SmolLM2 ({len(tokenizer)} tokens); 8 constrained rows, {args.steps} steps")
    print(f"{'library':<14} {'prepare s':>10} {'nested ms':>10} {'tool ms':>9} {'step ms p50':>12} {'p90':>7}")
    for r in results:
        print(f"{r['library']:<14} {r['prepare_s']:>10.2f} {r['compile_nested_ms']:>10.1f} {r['compile_tool_ms']:>9.1f} "
              f"{r['step_8_rows_ms_median']:>12.3f} {r['step_8_rows_ms_p90']:>7.3f}")
    summary: dict[str, Any] = {"cpu": cpu_kind(), "libraries": results}
    try:
        summary.update(apply_cost(len(tokenizer)))
        print(f"apply_bitmask, 8 of 16 rows, V={len(tokenizer)} ({'CPU operator' if summary['cpu_operator'] else 'torch ops'}): "
              f"{summary['apply_8_of_16_ms_median']:.3f} ms random masks, {summary['apply_8_of_16_sparse_ms_median']:.3f} ms "
              f"grammar-like; the torch ops: {summary['torch_ops_8_of_16_ms_median']:.3f} ms")
    except ImportError:
        pass
    if args.engine:
        summary["engine"] = engine_batch()
        e = summary["engine"]
        print(f"batch of 16 (tiny model): free rows {e['free_rows_tok_s_all_free']:.1f} tok/s alone, "
              f"{e['free_rows_tok_s_mixed']:.1f} beside 8 constrained ({e['ratio']:.2f}x)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
