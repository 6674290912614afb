"""One decode step, by context length and by batch size, for each way the engine can run it, in one process.

    python -m bench.step_bench                        # embedded model: eager and the compiled package
    python -m bench.step_bench --torch-compile        # also torch.compile's frozen step (compiles ~70 s)
    python -m bench.step_bench --contexts 10,1000,4000,8000 --rounds 5
    python -m bench.step_bench --rows 1,2,4,8,16      # the batch sweep: that many short sequences per step

The steps take turns on the same sequence (eager, package, torch.compile, eager, ...), so a slow
spell of a shared machine hits all of them alike; each figure is the mean over ``--steps`` steps,
and the table shows the range over ``--rounds`` rounds. The ratio is the step time at the shortest
context over the step time at the longest (the share of short-context speed kept). The batch sweep
times one step over ``--rows`` sequences of a short prompt each; the package covers the rows that the
engine compiles for (all of them over packed quantized weights, four over float weights) and the engine
decodes bigger batches eagerly, so there its row repeats the eager one.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--contexts", default="10,4000", help="comma-separated context lengths")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", default="1,4,16", help="comma-separated batch sizes for the batch sweep ('' skips it)")
    ap.add_argument("--torch-compile", action="store_true", help="also time torch.compile's frozen step")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    batch_rows = [int(r) for r in args.rows.split(",") if r]

    from llama_lab import load_model
    from llama_lab.engine import Engine
    from llama_lab.engine.paged_runner import PrefillJob

    lm = load_model(args.model)
    engine = Engine(lm, compile=True, max_batch_size=max([4, *batch_rows]))
    runner = engine.runner

    def timed(step, seqs: list, into: list[float]) -> None:
        runner.compiled = step
        for _ in range(3):
            runner.decode(seqs, [100] * len(seqs))
        t = time.perf_counter()
        for _ in range(args.steps):
            runner.decode(seqs, [100] * len(seqs))
        into.append((time.perf_counter() - t) / args.steps * 1e3)

    def run() -> tuple[dict[str, dict[int, list[float]]], dict[str, dict[int, list[float]]]]:
        sides = {"eager": None, "package": runner.compiled}
        if args.torch_compile:
            import torch._inductor.config as inductor

            from llama_lab.engine.compiled_step import INDUCTOR_OPTIONS

            for key, value in INDUCTOR_OPTIONS.items():
                if not key.startswith("aot_inductor."):
                    setattr(inductor, key, value)
            sides["torch.compile"] = torch.compile(runner.model, dynamic=False, fullgraph=True)
        times: dict[str, dict[int, list[float]]] = {name: {c: [] for c in contexts} for name in sides}
        keep = runner.compiled
        for ctx in contexts:
            seq = runner.reserve(ctx + 2 * args.steps * len(sides) * args.rounds + 16)
            ids = (list(range(100, 1100)) * (ctx // 1000 + 1))[:ctx]
            for start in range(0, ctx, 512):
                runner.prefill([PrefillJob(seq, ids[start:start + 512], start + 512 >= ctx)], lambda: False)
            for _ in range(args.rounds):
                for name, step in sides.items():
                    timed(step, [seq], times[name][ctx])
            runner.release(seq)
        by_rows: dict[str, dict[int, list[float]]] = {name: {r: [] for r in batch_rows} for name in sides}
        for rows in batch_rows:
            seqs = [runner.reserve(16 + 2 * (args.steps + 3) * len(sides) * args.rounds + 16) for _ in range(rows)]
            for i, seq in enumerate(seqs):
                runner.prefill([PrefillJob(seq, list(range(100 + i, 116 + i)), True)], lambda: False)
            for _ in range(args.rounds):
                for name, step in sides.items():
                    timed(step, seqs, by_rows[name][rows])
            for seq in seqs:
                runner.release(seq)
        runner.compiled = keep
        return times, by_rows

    try:
        times, by_rows = engine.call(run).result()
    finally:
        engine.close()
    print(f"model={args.model}; ms per decode step of one sequence (range over {args.rounds} rounds of {args.steps} steps); "
          f"package {engine.describe()['compiled_package']}")
    print(f"{'step':<15}" + "".join(f"{'ctx ' + str(c):>16}" for c in contexts) + f"{'ratio':>8}")
    summary = {}
    for name, by_ctx in times.items():
        mids = {c: sorted(v)[len(v) // 2] for c, v in by_ctx.items()}
        ratio = round(mids[contexts[0]] / mids[contexts[-1]], 2)
        print(f"{name:<15}" + "".join(f"{min(v):>7.1f} - {max(v):<6.1f}" for v in by_ctx.values()) + f"{ratio:>8}")
        summary[name] = {"ms": {str(c): [round(x, 2) for x in v] for c, v in by_ctx.items()}, "ratio": ratio}
    if batch_rows:
        print(f"ms per decode step of N sequences (short prompts; range over {args.rounds} rounds; "
              f"the engine compiles for up to {runner.compiled_max_rows} rows)")
        print(f"{'step':<15}" + "".join(f"{'rows ' + str(r):>16}" for r in batch_rows))
        for name, by_r in by_rows.items():
            print(f"{name:<15}" + "".join(f"{min(v):>7.1f} - {max(v):<6.1f}" for v in by_r.values()))
            summary[name]["rows_ms"] = {str(r): [round(x, 2) for x in v] for r, v in by_r.items()}
    print(json.dumps({"bench": "step", "model": args.model, "rows": summary}))


if __name__ == "__main__":
    main()
