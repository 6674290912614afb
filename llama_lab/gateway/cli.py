"""``llama-lab gateway``: run a gateway, or manage a running one's channels, tokens and logs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from llama_lab.gateway.admin import DEFAULT_URL, Gateway, GatewayAdminError
from llama_lab.gateway.settings import GatewaySettings
from llama_lab.web.flags import FlagParser, add_settings_flags, settings_from_args

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_expiry(text: str) -> float | None:
    """'never', a duration from now ('30d', '12h'), a date ('2026-12-31'), or unix seconds."""
    text = text.strip().lower()
    if text in ("never", "none", "null", ""):
        return None
    if m := _DURATION.match(text):
        return time.time() + float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: use never, 30d, 12h, 2026-12-31 or unix seconds") from exc


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _mapping(items: list[str] | None) -> dict[str, str] | None:
    if items is None:
        return None
    out = {}
    for item in items:
        name, sep, upstream = item.partition("=")
        if not sep or not name or not upstream:
            raise SystemExit(f"--map wants REQUESTED=UPSTREAM, got {item!r}")
        out[name] = upstream
    return out


def _client_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=f"gateway URL [env LLAMA_LAB_GATEWAY_URL, default {DEFAULT_URL}]")
    common.add_argument("--admin-key", dest="client_admin_key", default=argparse.SUPPRESS, help="admin key [env LLAMA_LAB_ADMIN_KEY]")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of a table")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="llama-lab gateway",
        description="Several OpenAI-compatible backends behind one endpoint, with tokens, quotas and failover. "
        "Without a subcommand, runs the gateway in the foreground.",
    )
    add_settings_flags(parser, GatewaySettings)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", metavar="{serve,channel,token,logs}", parser_class=FlagParser)
    serve = sub.add_parser("serve", help="run the gateway (the default)")
    add_settings_flags(serve, GatewaySettings)
    common = _client_flags()

    channel = sub.add_parser("channel", help="manage backends").add_subparsers(dest="action", required=True)
    add = channel.add_parser("add", parents=[common], help="add a backend")
    add.add_argument("name")
    add.add_argument("base_url", help="OpenAI-compatible base URL, e.g. http://192.168.1.20:19327/v1")
    _channel_fields(add, creating=True)
    channel.add_parser("list", parents=[common], help="list channels")
    upd = channel.add_parser("update", parents=[common], help="change a channel")
    upd.add_argument("id", type=int)
    upd.add_argument("--name")
    upd.add_argument("--base-url")
    _channel_fields(upd, creating=False)
    for action, text in (("delete", "delete a channel"), ("test", "send a tiny real request and report latency or the error")):
        p = channel.add_parser(action, parents=[common], help=text)
        p.add_argument("id", type=int)

    token = sub.add_parser("token", help="manage API keys").add_subparsers(dest="action", required=True)
    tadd = token.add_parser("add", parents=[common], help="create a key (shown once)")
    tadd.add_argument("name")
    _token_fields(tadd, creating=True)
    token.add_parser("list", parents=[common], help="list tokens")
    tupd = token.add_parser("update", parents=[common], help="change a token")
    tupd.add_argument("id", type=int)
    tupd.add_argument("--name")
    _token_fields(tupd, creating=False)
    tdel = token.add_parser("delete", parents=[common], help="delete a token")
    tdel.add_argument("id", type=int)

    logs = sub.add_parser("logs", parents=[common], help="show the request log, newest first")
    logs.add_argument("--token", dest="token_id", type=int)
    logs.add_argument("--channel", dest="channel_id", type=int)
    logs.add_argument("--model")
    logs.add_argument("--status", type=int)
    logs.add_argument("--since", type=parse_expiry, help="unix seconds or a date")
    logs.add_argument("--limit", type=int, default=20)
    return parser


def _channel_fields(p: argparse.ArgumentParser, creating: bool) -> None:
    p.add_argument("--api-key", help="key the backend expects (sent upstream as Bearer)")
    p.add_argument("--models", type=_csv, help="comma-separated models it serves (empty = any)")
    p.add_argument("--map", action="append", metavar="REQUESTED=UPSTREAM", help="rename a model upstream (repeatable)")
    p.add_argument("--priority", type=int, help="higher is tried first")
    p.add_argument("--weight", type=int, help="share of traffic among channels of equal priority")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--disable", dest="enabled", action="store_false", default=None)
    if not creating:
        group.add_argument("--enable", dest="enabled", action="store_true", default=None)


def _token_fields(p: argparse.ArgumentParser, creating: bool) -> None:
    p.add_argument("--models", type=_csv, help="comma-separated allowed models (empty = all)")
    p.add_argument("--expires", dest="expires_at", type=parse_expiry, default=argparse.SUPPRESS, help="never, 30d, 12h, 2026-12-31 or unix seconds")
    quota = p.add_mutually_exclusive_group()
    quota.add_argument("--quota", type=int, default=argparse.SUPPRESS, help="tokens (prompt + completion) it may use")
    quota.add_argument("--unlimited", dest="quota", action="store_const", const=None, default=argparse.SUPPRESS)
    p.add_argument("--subnet", dest="subnets", action="append", help="allowed client subnet, e.g. 192.168.1.0/24 (repeatable)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--disable", dest="enabled", action="store_false", default=None)
    if not creating:
        group.add_argument("--enable", dest="enabled", action="store_true", default=None)
        p.add_argument("--used", type=int, help="set the used count (0 resets it)")


def _fields(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """Only what the user typed, so an update leaves everything else as it was."""
    return {n: getattr(args, n) for n in names if hasattr(args, n) and (getattr(args, n) is not None or n in ("quota", "expires_at"))}


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
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


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


CHANNEL_COLUMNS = ["id", "name", "base_url", "models", "priority", "weight", "enabled", "auto_disabled", "last_test_latency_ms"]
TOKEN_COLUMNS = ["id", "name", "key_hint", "models", "quota", "used", "enabled", "expires_at"]
LOG_COLUMNS = ["id", "token_name", "channel_name", "model", "prompt_tokens", "completion_tokens", "latency_ms", "status", "error"]


def run_admin(args: argparse.Namespace) -> int:
    url = getattr(args, "url", None) or os.environ.get("LLAMA_LAB_GATEWAY_URL") or DEFAULT_URL
    key = getattr(args, "client_admin_key", None) or getattr(args, "admin_key", None) or os.environ.get("LLAMA_LAB_ADMIN_KEY")
    as_json = getattr(args, "json", False)
    with Gateway(url, key) as gw:
        if args.command == "channel":
            fields = _fields(args, ["api_key", "models", "priority", "weight", "enabled"])
            if getattr(args, "map", None) is not None:
                fields["model_mapping"] = _mapping(args.map)
            if args.action == "add":
                _print(gw.add_channel(args.name, args.base_url, **fields), as_json)
            elif args.action == "list":
                _print(gw.channels(), as_json, CHANNEL_COLUMNS)
            elif args.action == "update":
                fields.update(_fields(args, ["name", "base_url"]))
                _print(gw.update_channel(args.id, **fields), as_json)
            elif args.action == "delete":
                gw.delete_channel(args.id)
                print(f"deleted channel {args.id}")
            elif args.action == "test":
                result = gw.test_channel(args.id)
                _print(result, as_json)
                return 0 if result.ok else 1
        elif args.command == "token":
            fields = _fields(args, ["models", "expires_at", "quota", "subnets", "enabled"])
            if args.action == "add":
                created = gw.add_token(args.name, **fields)
                _print(created, as_json)
                if not as_json:
                    print(f"\nkey: {created.key}\n(shown once: only its hash is stored)")
            elif args.action == "list":
                _print(gw.tokens(), as_json, TOKEN_COLUMNS)
            elif args.action == "update":
                fields.update(_fields(args, ["name", "used"]))
                _print(gw.update_token(args.id, **fields), as_json)
            elif args.action == "delete":
                gw.delete_token(args.id)
                print(f"deleted token {args.id}")
        elif args.command == "logs":
            filters = _fields(args, ["token_id", "channel_id", "model", "status", "since", "limit"])
            _print(gw.logs(**filters), as_json, LOG_COLUMNS)
    return 0


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    from llama_lab.gateway.app import create_gateway_app

    settings = settings_from_args(GatewaySettings, args)
    app = create_gateway_app(settings)
    log.info("gateway on http://%s:%d, database %s", settings.host, settings.port, settings.db)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, timeout_graceful_shutdown=3)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in (None, "serve"):
        return run_server(args)
    try:
        return run_admin(args)
    except GatewayAdminError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
