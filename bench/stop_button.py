"""The stop-button experiment (seed Bug 2) from the command line: llama_lab's server vs the old demo's pattern.

    python -m bench.stop_button                 # embedded SmolLM2, 300-token answer, leave after 20 chunks
    python -m bench.stop_button --quick         # CI-sized run (about a minute)
    python -m bench.stop_button --plot stop.png

Each server runs as a subprocess; a streaming client leaves mid-answer by closing the connection
(what NextChat's stop button does in the browser build). Prints, per server, the tokens generated
after the client left (the server's own counter), seconds until its CPU was idle, and its
CPU-seconds in the 3 s after leaving; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from llama_lab.lab.stop_experiment import StopSettings, compare, format_table, plot, summary_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short settings (100-token answer, leave after 8 chunks)")
    p.add_argument("--model", default="default", help="any load_model source, e.g. random:tiny")
    p.add_argument("--max-tokens", type=int, default=None, help="length of the answer asked for (default 300; quick 100)")
    p.add_argument("--leave-after", type=int, default=None, help="chunks read before leaving (default 20; quick 8)")
    p.add_argument("--watch-s", type=float, default=None, help="stop waiting for idle after this many seconds")
    p.add_argument("--threads", type=int, default=1, help="torch threads per server (0: torch's default)")
    p.add_argument("--only", choices=["llama_lab", "old demo"], help="run one server only")
    p.add_argument("--plot", help="save the comparison plot (PNG) here")
    p.add_argument("--json-out", help="also write the JSON result to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides = {"model": args.model, "threads": args.threads or None}
    for field in ("max_tokens", "leave_after", "watch_s"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    settings = StopSettings.quick(**overrides) if args.quick else StopSettings(**overrides)
    servers = [args.only] if args.only else ["llama_lab", "old demo"]
    results = compare(settings, servers)
    print(format_table(results))
    for r in results:
        if r.server == "old demo":
            reached = "stop flag set" in r.log
            print(f"old demo's `except asyncio.CancelledError` branch reached: {'yes' if reached else 'no'}")
    if args.plot:
        plot(results).savefig(args.plot, dpi=100)
        print(f"saved {args.plot}")
    out = summary_json(results)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
