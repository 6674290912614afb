"""``llama-lab serve``: flags generated from ``ServerSettings``.

The old demo's command line works unchanged: ``--base_model DIR --gpus 0 --load_in_8bit
--load_in_4bit --only_cpu --port N``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from llama_lab.server.settings import ServerSettings
from llama_lab.web.flags import add_settings_flags, settings_from_args

logger = logging.getLogger("llama_lab.cli")

# Old demo flags that select a load mode.
MODE_FLAGS = {"load_in_8bit": "8bit", "load_in_4bit": "4bit", "only_cpu": "cpu"}


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible API",
                       description="Serve a model behind an OpenAI-compatible API (default: the embedded model on 127.0.0.1:19327).")
    add_settings_flags(p, ServerSettings)
    for flag, mode in MODE_FLAGS.items():
        p.add_argument(f"--{flag}", dest=flag, action="store_true", default=False,
                       help=f"old demo flag: same as --mode {mode}")
    return p


def run_serve(args: argparse.Namespace) -> int:
    chosen = [m for f, m in MODE_FLAGS.items() if getattr(args, f)]
    if len(chosen) > 1:
        return fail("use only one of --load_in_8bit, --load_in_4bit, --only_cpu")
    settings = settings_from_args(ServerSettings, args, **({"mode": chosen[0]} if chosen else {}))
    configure_logging(settings.log_level)
    import uvicorn

    from llama_lab.model import LoadError
    from llama_lab.server.app import create_app
    from llama_lab.server.settings import build_engine

    try:
        engine = build_engine(settings)
    except (LoadError, OSError) as exc:
        return fail(f"cannot load model {settings.model!r}: {exc}")
    loaded = engine.loaded
    app = create_app(engine, settings)
    logger.info("serving %s (%s on %s) at http://%s:%d/v1", loaded.name, loaded.mode.value, loaded.device,
                settings.host, settings.port)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, log_level=settings.log_level,
                    access_log=settings.log_level == "debug", timeout_graceful_shutdown=3)
    finally:
        engine.close()
    return 0


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def fail(message: str) -> int:
    print(f"llama-lab: error: {message}", file=sys.stderr)
    return 2
