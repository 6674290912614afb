"""Settings declared once (pydantic-settings) and turned into command-line flags for every CLI.

Each field becomes ``--field-name`` (plus ``--field_name``, the old demo's spelling, and any
``aliases`` in its ``json_schema_extra``), with its description, default and env var in the help.
Values stay strings until the settings model validates them, so a bad value is reported once,
by pydantic, naming the flag.
"""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Annotated, Any, TypeVar

from pydantic import AliasChoices, BeforeValidator, ValidationError
from pydantic_settings import BaseSettings, NoDecode

S = TypeVar("S", bound=BaseSettings)


def _split_commas(value: Any) -> Any:
    """``"a,b"`` and ``["a,b", "c"]`` (a repeated flag) both become ``["a", "b", "c"]``."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)):
        return [part.strip() for item in value for part in str(item).split(",") if part.strip()]
    return value


# A list given as "a,b" on the command line or in an env var (NoDecode: not parsed as JSON first).
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]


class FlagParser(argparse.ArgumentParser):
    """argparse that exits 2 with one clear line naming the bad flag and where to read more."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"llama-lab: error: {message} (see `{self.prog} --help`)\n")


def env_name(settings_cls: type[BaseSettings], name: str) -> str:
    """The environment variable a field reads (its first alias if it declares several)."""
    alias = settings_cls.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"{settings_cls.model_config.get('env_prefix', '')}{name}".upper()


def add_settings_flags(parser: argparse.ArgumentParser, settings_cls: type[BaseSettings]) -> None:
    """One flag per settings field; unset flags are absent from the namespace (the env var or default wins)."""
    for name, info in settings_cls.model_fields.items():
        flags = [f"--{name.replace('_', '-')}"]
        if "_" in name:
            flags.append(f"--{name}")
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        flags += list(extra.get("aliases", []))
        default = info.get_default(call_default_factory=True)
        shown = getattr(default, "value", default)
        if isinstance(shown, list):
            shown = ",".join(shown) or "none"
        help_text = f"{info.description} [default: {shown}; env {env_name(settings_cls, name)}]"
        if info.annotation is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        elif typing.get_origin(info.annotation) is list or "CommaList" in str(info.annotation):
            parser.add_argument(*flags, dest=name, action="append", default=argparse.SUPPRESS, help=help_text,
                                metavar=name.upper())
        else:
            parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=help_text, metavar=name.upper())


def settings_from_args(settings_cls: type[S], args: argparse.Namespace, **overrides: Any) -> S:
    """Build the settings from the flags that were given; exit 2 with one line naming a bad flag."""
    values = {n: getattr(args, n) for n in settings_cls.model_fields if hasattr(args, n)}
    values.update(overrides)
    try:
        return settings_cls(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err.get("loc") else ""
        flag = "--" + field.replace("_", "-") if field in settings_cls.model_fields else "a flag"
        print(f"llama-lab: error: invalid value for {flag}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
