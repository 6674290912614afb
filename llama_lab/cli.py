"""``llama-lab``: ``serve`` (the OpenAI server) and ``gateway`` (tokens, quotas, failover)."""

from __future__ import annotations

import sys
from typing import Sequence

from llama_lab.web.flags import FlagParser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "gateway":
        from llama_lab.gateway.cli import main as gateway_main

        return gateway_main(argv[1:])
    from llama_lab.server.cli import add_serve_parser, run_serve

    parser = FlagParser(prog="llama-lab", description="Serve, profile and gateway your own Llama-family chat models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=FlagParser)
    serve_parser = add_serve_parser(sub)
    sub.add_parser("gateway", help="run the API gateway (tokens, quotas, failover); see `llama-lab gateway --help`")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, so the hint names `llama-lab serve --help`
        (serve_parser if args.command == "serve" else parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "serve":
        return run_serve(args)
    parser.print_help()
    return 0 if not argv else 2


if __name__ == "__main__":
    raise SystemExit(main())
