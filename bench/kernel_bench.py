"""Weight-only quantized matrix products on this CPU: our kernels against torch's, at decode shapes.

    python -m bench.kernel_bench                 # one thread (the kernels' own cost)
    python -m bench.kernel_bench --threads 2
    LLAMA_LAB_KERNEL_CFLAGS=-mno-avx512f python -m bench.kernel_bench   # our AVX2 loops on an AVX512 CPU
    python -m bench.kernel_bench --rows 16,32,64,256 --sides "fp32,ours" --threads 2   # batches and prompt chunks

For each weight shape (SmolLM2's MLP and output head, Llama-3-8B's MLP) and 1 or 4 activation rows (``--rows``;
from ``quant.gemm_rows()`` rows on, 32 with a bf16 GEMM and 128 with an fp32 one, ours dequantize weight tiles
for that GEMM; below they run integer dot products):
fp32 ``F.linear``, torch's ``_weight_int8pack_mm`` (per-channel int8) and ``_weight_int4pack_mm_for_cpu``
(group 32, bf16 activations: its fast input), and ours (``q4``, ``q5``, ``q8``: groups of 32). Best of 7 rounds,
microseconds per product, and each one's speed relative to fp32. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

SHAPES = [(576, 3072), (1536, 576), (576, 49152), (4096, 14336)]


def best_us(fn, calls: int) -> float:
    for _ in range(max(3, calls // 10)):
        fn()
    rounds = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t) / calls * 1e6)
    return min(rounds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,4", help="comma-separated activation row counts")
    ap.add_argument("--sides", default="", help="comma-separated substrings: only the sides whose name has one")
    ap.add_argument("--shapes", default="", help="comma-separated KxN (default: all four)")
    args = ap.parse_args(argv)
    try:
        row_counts = [int(r) for r in args.rows.split(",") if r.strip()]
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s.strip()] or SHAPES
    except ValueError:
        ap.error(f"--rows takes integers and --shapes KxN pairs, not {args.rows!r} / {args.shapes!r}")
    if not row_counts or min(row_counts) < 1 or any(len(s) != 2 or s[0] % 32 for s in shapes):
        ap.error("--rows must be positive and each --shapes K a multiple of 32")
    wanted = [w.strip() for w in args.sides.split(",") if w.strip()]
    torch.set_num_threads(args.threads)
    from llama_lab.profiling import cpu_kind
    from llama_lab.kernels.build import kernel_path
    from llama_lab.model.quant import QuantLinear, require_kernels

    require_kernels()
    rows = []
    for k, n in shapes:
        linear = nn.Linear(k, n, bias=False)
        q4, q5, q8 = (QuantLinear.from_linear(linear, kind) for kind in ("q4", "q5", "q8"))
        w8 = torch.randint(-127, 127, (n, k), dtype=torch.int8)
        s8 = torch.rand(n)
        w4 = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
        sz4 = torch.rand(k // 32, n, 2, dtype=torch.bfloat16)
        for m in row_counts:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            calls = max(3, int(2e8 / (k * n * m)))
            sides = {
                "fp32 F.linear": lambda: linear(x),
                "torch int8pack": lambda: torch._weight_int8pack_mm(x, w8, s8),
                "torch int4pack (bf16 x)": lambda: torch._weight_int4pack_mm_for_cpu(xb, w4, 32, sz4),
                "ours q8": lambda: q8(x),
                "ours q4": lambda: q4(x),
                "ours q5": lambda: q5(x),
            }
            times = {name: best_us(fn, calls) for name, fn in sides.items()
                     if name == "fp32 F.linear" or not wanted or any(w in name for w in wanted)}
            rows.append({"k": k, "n": n, "rows": m, "us": times})
    names = list(rows[0]["us"])
    print(f"\n{cpu_kind()}, {args.threads} thread(s), our kernels' {kernel_path()} loops; "
          "microseconds per product (x fp32's speed)\n")
    print("| K x N | rows | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in rows:
        base = r["us"]["fp32 F.linear"]
        cells = [f"{r['us'][n]:.0f} ({base / r['us'][n]:.2f}x)" for n in names]
        print(f"| {r['k']} x {r['n']} | {r['rows']} | " + " | ".join(cells) + " |")
    print(json.dumps({"cpu": cpu_kind(), "kernel_path": kernel_path(), "threads": args.threads, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
