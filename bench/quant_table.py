"""The quantization table from the command line: every load mode, one fresh process each.

    python -m bench.quant_table                       # embedded SmolLM2, every mode -> data/quant_table_cpu.csv
    python -m bench.quant_table --quick               # CI-sized run (the CPU kernels' modes decode eagerly)
    python -m bench.quant_table --modes gguf,int4     # some modes only
    python -m bench.quant_table --source random:llama-3-8b --out data/quant_table_gpu.csv   # on a GPU

Prints the table, the theoretical bytes of the 8B preset beside the seed's nvidia-smi figures,
and, as the last stdout line, one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from llama_lab.lab.quant_table import (
    SEED_8B_MIB, BenchSettings, format_table, machine_info, run_table, save_csv, summary_json, theory_table,
)
from llama_lab.web.flags import split_commas


DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # the repository's results folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="default", help="'default', a HF dir, a .gguf file or random:<preset>")
    p.add_argument("--modes", default=None,
                   help="comma-separated load modes (default: full,8bit,4bit,cpu with a GPU; without one "
                        "full,8bit,4bit,gguf (a GGUF source),int8,int4)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens decoded per request (default 64; quick 12)")
    p.add_argument("--batch", type=int, default=8, help="concurrent requests for the batched decode figure")
    p.add_argument("--quick", action="store_true",
                   help="short settings (CI); gguf, int8 and int4 decode eagerly (no compile per mode)")
    p.add_argument("--no-isolate", action="store_true", help="measure every mode in this process (RSS figures accumulate)")
    p.add_argument("--device", default=None, help="GPU to use, e.g. 0 or cuda:1")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="compute dtype override")
    p.add_argument("--out", default=None, help="CSV path (default data/quant_table_<cpu|gpu>.csv)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per speed figure (median and spread shown)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the engine's decode step (default: the engine's default, on unless LLAMA_LAB_COMPILE=0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    overrides = dict(source=args.source, batch=args.batch, isolate=not args.no_isolate,
                     device=args.device, dtype=args.dtype, repeats=args.repeats, compile=args.compile)
    if args.decode_tokens is not None:
        overrides["decode_tokens"] = args.decode_tokens
    if args.modes:
        overrides["modes"] = tuple(split_commas(args.modes))
    if args.compile:  # asked for by name: quick settings compile every mode too
        overrides["eager_modes"] = ()
    settings = BenchSettings.quick(**overrides) if args.quick else BenchSettings(**overrides)

    results = run_table(settings, progress=not args.no_progress)
    machine = machine_info()
    out = Path(args.out) if args.out else DATA_DIR / f"quant_table_{'cpu' if machine['gpu'] == 'none' else 'gpu'}.csv"
    save_csv(results, out, machine)

    is_8b = any(r.params > 7e9 for r in results)
    print(f"machine: {machine['cpu']} x{machine['cpu_cores']}, GPU: {machine['gpu']}; torch {machine['torch']}, "
          f"transformers {machine['transformers']}, bitsandbytes {machine['bitsandbytes']}")
    print()
    print(format_table(results, SEED_8B_MIB if is_8b else None))
    print()
    print("theoretical weight bytes of the seed's 8B model (parameters x bits/8 in each mode's layout):")
    print(theory_table("llama-3-8b"))
    print()
    for r in results:
        if not r.error:
            print(f"{r.mode:>5} greedy answer: {r.greedy_answer!r}  (weights: {r.weights_layout})")
    print(f"saved {out}")
    failed = [r.mode for r in results if r.error]
    summary = {"settings": dataclasses.asdict(settings), "machine": machine, "csv": str(out),
               "results": summary_json(results), "failed": failed}
    print(json.dumps(summary, ensure_ascii=False))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
