"""The CPU attention kernel alone: a long prompt prefilled in chunks, and one decode step at its end.

    python -m bench.attention_bench                         # SmolLM2's heads (9 query, 3 KV, head_dim 64)
    python -m bench.attention_bench --heads 32,8,128        # Llama-3-8B's
    LLAMA_LAB_KERNEL_CFLAGS=-mno-avx512bf16 python -m bench.attention_bench   # the AVX512 loop without BF16
    LLAMA_LAB_KERNEL_CFLAGS=-mno-avx512f python -m bench.attention_bench      # the AVX2 loop on an AVX512 CPU

For each cache dtype: milliseconds for one layer's attention over a ``--context``-token prompt prefilled in
``--chunk``-token chunks (each chunk's tokens attend to every key before them, as the engine's prefill does;
best of ``--rounds``), and microseconds for one token decoding at the end of that context (mean of 200 calls; with
``--layers 30`` over 30 layers' caches in turn, so the keys come from memory as in a model's step).
A prompt's total is that times the model's layers. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default="9,3,64", help="query heads, KV heads, head_dim")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--block", type=int, default=16, help="tokens per KV block")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--contiguous", action="store_true", help="the blocks in order (one sequence in a fresh cache)")
    ap.add_argument("--layers", type=int, default=1,
                    help="decode over this many layers' caches in turn (30: SmolLM2's, read from memory, not cache)")
    args = ap.parse_args(argv)
    try:
        heads, kv_heads, head_dim = (int(v) for v in args.heads.split(","))
        dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",") if d.strip()]
    except (ValueError, KeyError):
        ap.error(f"--heads takes three integers and --dtypes some of {sorted(DTYPES)}")
    if heads % kv_heads or args.context < 1 or args.chunk < 1 or args.block < 1 or args.context % args.block:
        ap.error("--heads must be a multiple of the KV heads, and --context a positive multiple of --block")
    torch.set_num_threads(args.threads)
    from llama_lab.engine.attention import cpu_kernel
    from llama_lab.kernels.build import kernel_path
    from llama_lab.profiling import cpu_kind

    kernel = cpu_kernel()
    if kernel is None:
        raise SystemExit("the CPU attention kernel could not be built here")
    blocks = args.context // args.block
    table = (torch.randperm(blocks) if not args.contiguous else torch.arange(blocks)).to(torch.int32)[None]
    scale = head_dim ** -0.5
    results = {}
    print(f"{cpu_kind()}, {args.threads} threads, kernels: {kernel_path()}; heads {heads}/{kv_heads} x {head_dim}, "
          f"{args.context}-token prompt in {args.chunk}-token chunks")
    print(f"{'cache':<6}{'prefill ms/layer':>18}{'decode us/layer':>17}")
    for dtype in dtypes:
        torch.manual_seed(0)
        layers = [(torch.randn(kv_heads, blocks, args.block, head_dim).to(dtype),
                   torch.randn(kv_heads, blocks, args.block, head_dim).to(dtype)) for _ in range(max(1, args.layers))]
        kc, vc = layers[0]
        chunks = [(start, torch.randn(min(args.chunk, args.context - start), heads, head_dim).to(dtype))
                  for start in range(0, args.context, args.chunk)]

        def prefill() -> None:
            for start, q in chunks:
                n = q.shape[0]
                kernel(q, kc, vc, table, torch.zeros(n, dtype=torch.long), torch.arange(start, start + n), scale)

        best = float("inf")
        for _ in range(args.rounds + 1):  # the first warms up
            t = time.perf_counter()
            prefill()
            best = min(best, time.perf_counter() - t)
        q1 = torch.randn(1, heads, head_dim).to(dtype)
        row, pos = torch.zeros(1, dtype=torch.long), torch.tensor([args.context - 1])
        for _ in range(20):
            for k_l, v_l in layers:
                kernel(q1, k_l, v_l, table, row, pos, scale)
        t = time.perf_counter()
        for _ in range(200):
            for k_l, v_l in layers:
                kernel(q1, k_l, v_l, table, row, pos, scale)
        decode = (time.perf_counter() - t) / (200 * len(layers))
        name = str(dtype).removeprefix("torch.")
        results[name] = {"prefill_ms": round(best * 1e3, 2), "decode_us": round(decode * 1e6, 1)}
        print(f"{name:<10}{best * 1e3:>14.1f}{decode * 1e6:>17.1f}")
    print(json.dumps({"bench": "attention", "cpu": cpu_kind(), "kernels": kernel_path(),
                      "heads": [heads, kv_heads, head_dim],
                      "context": args.context, "chunk": args.chunk, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
