"""``llama-lab gateway``: run a gateway, or manage a running one's channels, tokens and logs.

The flags of ``channel``, ``token`` and ``logs`` are generated from the models in ``schemas``
(``web.flags.add_model_flags``), so a field added there shows up here, in the REST API and in the
client at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from pydantic import BaseModel

from llama_lab.gateway.admin import DEFAULT_URL, Gateway, GatewayAdminError
from llama_lab.gateway.schemas import CHANNELS, TOKENS, LogFilter, Resource
from llama_lab.gateway.settings import GatewaySettings
from llama_lab.web.flags import Cli, FlagParser, add_model_flags, add_settings_flags, model_values, settings_from_args

log = logging.getLogger(__name__)


def _client_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=f"gateway URL [env LLAMA_LAB_GATEWAY_URL, default {DEFAULT_URL}]")
    common.add_argument("--admin-key", dest="client_admin_key", default=argparse.SUPPRESS, help="admin key [env LLAMA_LAB_ADMIN_KEY]")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of a table")
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"],
                        help="log level of this command [default: warning; debug shows the HTTP requests]")
    return common


def _collection_commands(sub: Any, res: Resource, common: argparse.ArgumentParser, help_text: str) -> Any:
    actions = sub.add_parser(res.name, help=help_text).add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", parents=[common], help=f"add a {res.name}")
    add_model_flags(add, res.create, positional=True)
    actions.add_parser("list", parents=[common], help=f"list {res.path}")
    update = actions.add_parser("update", parents=[common], help=f"change a {res.name} (only the flags given)")
    update.add_argument("id", type=int)
    add_model_flags(update, res.patch)
    delete = actions.add_parser("delete", parents=[common], help=f"delete a {res.name}")
    delete.add_argument("id", type=int)
    return actions


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="llama-lab gateway",
        allow_abbrev=False,  # else `logs --token 1` is read here as an abbreviation of --tokens-per-usd
        description="Several OpenAI-compatible backends behind one endpoint, with tokens, quotas and failover. "
        "Without a subcommand, runs the gateway in the foreground.",
    )
    add_settings_flags(parser, GatewaySettings)
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                        help="[default: info for the server, warning for the admin commands]")
    sub = parser.add_subparsers(dest="command", metavar="{serve,channel,token,logs}", parser_class=FlagParser)
    serve = sub.add_parser("serve", help="run the gateway (the default)")
    add_settings_flags(serve, GatewaySettings)
    common = _client_flags()

    channel = _collection_commands(sub, CHANNELS, common, "manage backends")
    test = channel.add_parser("test", parents=[common], help="send a tiny real request and report latency or the error")
    test.add_argument("id", type=int)
    _collection_commands(sub, TOKENS, common, "manage API keys (a new key is shown once)")

    logs = sub.add_parser("logs", parents=[common], help="show the request log, newest first")
    add_model_flags(logs, LogFilter)
    return parser


def _table(rows: list[BaseModel], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    data = [[_cell(getattr(r, c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in data)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in data]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "*"
    if isinstance(value, dict) and any(isinstance(v, (dict, BaseModel)) for v in value.values()):
        return "; ".join(f"{k}={_limits(v)}" for k, v in value.items())
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _limits(value: dict | BaseModel) -> str:
    """One model's limits as ``--model-limit`` spells them: ``rpm:5,tpm:1000``."""
    items = value.model_dump() if isinstance(value, BaseModel) else value
    return ",".join(f"{kind}:{n}" for kind, n in items.items() if n is not None)


def _print(result: Any, as_json: bool, columns: list[str] | None = None) -> None:
    if as_json:
        data = [r.model_dump() for r in result] if isinstance(result, list) else result.model_dump() if isinstance(result, BaseModel) else result
        print(json.dumps(data, indent=2, ensure_ascii=False))
    elif isinstance(result, list):
        print(_table(result, columns or []))
    elif isinstance(result, BaseModel):
        for key, value in result.model_dump().items():
            print(f"{key:>22}: {_cell(value)}")
    else:
        print(result)


COLUMNS = {
    "channel": ["id", "name", "base_url", "models", "priority", "weight", "enabled", "auto_disabled", "last_test_latency_ms"],
    "token": ["id", "name", "key_hint", "models", "quota", "used", "rpm_limit", "tpm_limit", "max_parallel",
              "model_limits", "enabled", "expires_at"],
    "logs": ["id", "token_name", "channel_name", "model", "prompt_tokens", "completion_tokens", "latency_ms", "status", "error"],
}


def _run_collection(gw: Gateway, res: Resource, args: argparse.Namespace, as_json: bool) -> int:
    if args.action == "add":
        created = gw.add_item(res, **model_values(args, res.create))
        _print(created, as_json)
        if getattr(created, "key", None) and not as_json:
            print(f"\nkey: {created.key}\n(shown once: only its hash is stored)")
    elif args.action == "list":
        _print(gw.list_items(res), as_json, COLUMNS[res.name])
    elif args.action == "update":
        _print(gw.update_item(res, args.id, **model_values(args, res.patch)), as_json)
    elif args.action == "delete":
        gw.delete_item(res, args.id)
        print(f"deleted {res.name} {args.id}")
    elif args.action == "test":
        result = gw.test_channel(args.id)
        _print(result, as_json)
        return 0 if result.ok else 1
    return 0


def run_admin(args: argparse.Namespace) -> int:
    url = getattr(args, "url", None) or os.environ.get("LLAMA_LAB_GATEWAY_URL") or DEFAULT_URL
    key = getattr(args, "client_admin_key", None) or getattr(args, "admin_key", None) or os.environ.get("LLAMA_LAB_ADMIN_KEY")
    as_json = getattr(args, "json", False)
    with Gateway(url, key) as gw:
        if args.command == "logs":
            _print(gw.logs(**model_values(args, LogFilter)), as_json, COLUMNS["logs"])
            return 0
        return _run_collection(gw, {"channel": CHANNELS, "token": TOKENS}[args.command], args, as_json)


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    from llama_lab.gateway.app import create_gateway_app

    settings = settings_from_args(GatewaySettings, args)
    app = create_gateway_app(settings)
    log.info("gateway on http://%s:%d, database %s", settings.host, settings.port, settings.db)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, timeout_graceful_shutdown=3)
    return 0


def _configure_logging(level_name: str) -> None:
    """The CLI's log output; httpx's per-request INFO lines only at debug (one per proxied request otherwise)."""
    level = getattr(logging, level_name.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    serving = args.command in (None, "serve")
    args.log_level = args.log_level or ("info" if serving else "warning")
    _configure_logging(args.log_level)
    if serving:
        return run_server(args)
    try:
        return run_admin(args)
    except GatewayAdminError as exc:
        print(f"error: {_for_cli(exc, args)}", file=sys.stderr)
        return 1


def _for_cli(exc: GatewayAdminError, args: argparse.Namespace) -> str:
    """The refusal with the flag that gave the value (``--tpm``), not the API's field name (``tpm_limit``)."""
    model = {"channel": CHANNELS.patch, "token": TOKENS.patch, "logs": LogFilter}.get(args.command)
    info = model.model_fields.get(exc.field[0]) if model is not None and exc.field else None
    if info is None or exc.reason is None:
        return exc.message
    cli = next((m for m in info.metadata if isinstance(m, Cli)), Cli())
    flag = cli.flag or "--" + exc.field[0].replace("_", "-")
    inner = f" ({'.'.join(exc.field[1:])})" if len(exc.field) > 1 else ""
    return f"invalid value for {flag}{inner}: {exc.reason}"
