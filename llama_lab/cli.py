"""``llama-lab`` command line; ``serve`` flags are generated from ``ServerSettings``.

The old demo's command line works unchanged: ``--base_model DIR --gpus 0 --load_in_8bit
--load_in_4bit --only_cpu --port N``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from typing import Any, Sequence

logger = logging.getLogger("llama_lab.cli")

# Old demo flags that select a load mode.
_MODE_FLAGS = {"load_in_8bit": "8bit", "load_in_4bit": "4bit", "only_cpu": "cpu"}


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one clear line naming the bad flag."""

    def error(self, message: str) -> typing.NoReturn:
        command = self.prog.split()[-1]
        hint = "llama-lab --help" if command == "llama-lab" else f"llama-lab {command} --help"
        self.exit(2, f"llama-lab: error: {message} (see `{hint}`)\n")


def _serve_parser(sub: Any) -> argparse.ArgumentParser:
    from llama_lab.settings import ServerSettings

    p = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible API",
                       description="Serve a model behind an OpenAI-compatible API (default: the embedded model on 127.0.0.1:19327).")
    for name, info in ServerSettings.model_fields.items():
        flags = [f"--{name.replace('_', '-')}"]
        if "_" in name:
            flags.append(f"--{name}")
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        flags += list(extra.get("aliases", []))
        default = info.get_default(call_default_factory=True)
        shown = getattr(default, "value", default)
        if isinstance(shown, list):
            shown = ",".join(shown) or "none"
        help_text = f"{info.description} [default: {shown}; env LLAMA_LAB_{name.upper()}]"
        p.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=help_text, metavar=name.upper())
    for flag, mode in _MODE_FLAGS.items():
        p.add_argument(f"--{flag}", dest=flag, action="store_true", default=False,
                       help=f"old demo flag: same as --mode {mode}")
    return p


def _run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    values = {k: v for k, v in vars(args).items() if k not in ("command", *_MODE_FLAGS)}
    chosen = [m for f, m in _MODE_FLAGS.items() if getattr(args, f)]
    if len(chosen) > 1:
        return _fail("use only one of --load_in_8bit, --load_in_4bit, --only_cpu")
    if chosen:
        values["mode"] = chosen[0]
    from llama_lab.settings import ServerSettings

    try:
        settings = ServerSettings(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        flag = "--" + str(err["loc"][0]).replace("_", "-") if err.get("loc") else "a flag"
        return _fail(f"invalid value for {flag}: {err['msg']}")
    _configure_logging(settings.log_level)
    if settings.gpus is not None:  # like the old demo: choose GPUs before CUDA initializes
        os.environ["CUDA_VISIBLE_DEVICES"] = settings.gpus
    import uvicorn

    from llama_lab.app import create_app
    from llama_lab.engine import Engine
    from llama_lab.loading import LoadError, load_model

    try:
        loaded = load_model(settings.model, settings.mode, device="cuda:0" if settings.gpus else None, dtype=settings.dtype)
    except (LoadError, OSError) as exc:
        return _fail(f"cannot load model {settings.model!r}: {exc}")
    engine = Engine(loaded, max_batch_size=settings.max_batch_size, max_active=settings.max_concurrency,
                    prefill_chunk=settings.prefill_chunk)
    app = create_app(engine, settings)
    logger.info("serving %s (%s on %s) at http://%s:%d/v1", loaded.name, loaded.mode.value, loaded.device,
                settings.host, settings.port)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, log_level=settings.log_level,
                    access_log=settings.log_level == "debug", timeout_graceful_shutdown=3)
    finally:
        engine.close()
    return 0


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _fail(message: str) -> int:
    print(f"llama-lab: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "gateway":
        from llama_lab.gateway.cli import main as gateway_main

        return gateway_main(argv[1:])
    parser = _Parser(prog="llama-lab", description="Serve, profile and gateway your own Llama-family chat models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    serve_parser = _serve_parser(sub)
    sub.add_parser("gateway", help="run the API gateway (tokens, quotas, failover); see `llama-lab gateway --help`")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, so the hint names `llama-lab serve --help`
        (serve_parser if args.command == "serve" else parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "serve":
        return _run_serve(args)
    parser.print_help()
    return 0 if not argv else 2


if __name__ == "__main__":
    raise SystemExit(main())
