"""Pydantic models turned into command-line flags, for every CLI: one field, one flag.

Two kinds of model feed it. Settings (``add_settings_flags``): each field becomes ``--field-name``
(plus ``--field_name``, the old demo's spelling, and any ``aliases`` in its ``json_schema_extra``),
with its description, default and env var in the help; values stay strings until the settings
model validates them, so a bad value is reported once, by pydantic, naming the flag. Request
models such as the gateway's admin schemas (``add_model_flags``): a field whose spelling is not
the plain ``--field-name VALUE`` says how in ``Cli`` metadata, and each word is parsed as typed.
Both go through ``_add_field``, so a bool, a list or an optional value is a flag in one way only.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import dataclass, replace
from typing import Annotated, Any, Callable, TypeVar

from pydantic import AliasChoices, BaseModel, BeforeValidator, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode

S = TypeVar("S", bound=BaseSettings)


def split_commas(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``: the one reading of a comma-separated list."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _split_commas(value: Any) -> Any:
    """``"a,b"`` and ``["a,b", "c"]`` (a repeated flag) both become ``["a", "b", "c"]``."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)):
        return [part for item in value for part in split_commas(str(item))]
    return value


# A list given as "a,b" on the command line or in an env var (NoDecode: not parsed as JSON first).
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]


@dataclass(frozen=True)
class Cli:
    """How a field is spelled on the command line, when ``--field-name VALUE`` would not do.

    Pydantic ignores it in a field's metadata; ``add_model_flags`` reads it.
    """

    flag: str | None = None  # the option, when not --field-name
    aliases: tuple[str, ...] = ()  # more spellings of the same option
    parse: Callable[[str], Any] | None = None  # one command-line word -> value; ValueError = bad word
    repeat: bool = False  # given several times: a list, or a dict of (key, value) pairs
    on: str | None = None  # bool fields: the flag that sets True ...
    off: str | None = None  # ... and the one that sets False (neither: --flag / --no-flag)
    none: str | None = None  # a flag that sets the field to null (--unlimited)
    metavar: str | None = None
    default: Any = None  # a CLI-only default (``logs --limit`` shows 20 rows, the API 100)
    help: str | None = None  # instead of the field's description


_SCALARS: dict[Any, Any] = {int: int, float: float, str: str}


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


def value_type(info: FieldInfo) -> Any:
    """The field's type without ``None``: ``int | None`` -> int, ``list[str]`` -> list."""
    annotation = info.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    return typing.get_origin(annotation) or annotation


def add_settings_flags(parser: argparse.ArgumentParser, settings_cls: type[BaseSettings]) -> None:
    """One flag per settings field; unset flags are absent from the namespace (the env var or default wins)."""
    for name, info in settings_cls.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        aliases = ([f"--{name}"] if "_" in name else []) + list(extra.get("aliases", []))
        default = info.get_default(call_default_factory=True)
        shown = getattr(default, "value", default)
        if isinstance(shown, list):
            shown = ",".join(shown) or "none"
        help_text = f"{info.description} [default: {shown}; env {env_name(settings_cls, name)}]"
        # str: the settings model parses the words, so its error names the flag; lists are repeatable.
        cli = Cli(aliases=tuple(aliases), parse=str, repeat=value_type(info) is list, help=help_text)
        _add_field(parser, name, info, cli)


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], *, positional: bool = False) -> None:
    """One flag per field of ``model`` (absent from the namespace unless given, so an update changes only those).

    With ``positional``, the model's required fields are positional arguments (``channel add NAME BASE_URL``).
    """
    for name, info in model.model_fields.items():
        cli = next((m for m in info.metadata if isinstance(m, Cli)), Cli())
        if cli.default is not None:
            cli = replace(cli, help=f"{info.description or ''} [default here: {cli.default}]")
        _add_field(parser, name, info, cli, positional=positional and info.is_required())


def _add_field(parser: argparse.ArgumentParser, name: str, info: FieldInfo, cli: Cli, *, positional: bool = False) -> None:
    kind = value_type(info)
    parse = _word_parser(name, cli.parse or (split_commas if kind is list and not cli.repeat else _SCALARS.get(kind, str)))
    help_text = cli.help if cli.help is not None else info.description
    if positional:
        parser.add_argument(name, type=parse, help=help_text)
        return
    flags = [cli.flag or "--" + name.replace("_", "-"), *cli.aliases]
    common = {"dest": name, "default": cli.default if cli.default is not None else argparse.SUPPRESS}
    if kind is bool and cli.on is None and cli.off is None:
        parser.add_argument(*flags, action=argparse.BooleanOptionalAction, help=help_text, **common)
    elif kind is bool:
        group = parser.add_mutually_exclusive_group()
        on, off = cli.on or flags[0], cli.off or "--no-" + flags[0][2:]
        if info.default is not True:  # creating with default True: only the flag that changes it
            group.add_argument(on, action="store_true", help=help_text, **common)
        if info.default is not False:
            group.add_argument(off, action="store_false", help=f"{name}: false", **common)
    else:
        target = parser.add_mutually_exclusive_group() if cli.none else parser
        target.add_argument(*flags, type=parse, action="append" if cli.repeat else "store",
                            metavar=cli.metavar or name.upper(), help=help_text or "", **common)
        if cli.none:
            target.add_argument(cli.none, action="store_const", const=None, help=f"set {name} to null", **common)


def _word_parser(name: str, parse: Any) -> Any:
    """argparse reports a parser's ValueError as "invalid <func> value"; keep the parser's own words."""
    if parse in _SCALARS.values():
        return parse

    def word(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    word.__name__ = name
    return word


def model_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``model`` the user typed; a repeated ``--map A=B`` becomes a dict."""
    values = {n: getattr(args, n) for n in model.model_fields if hasattr(args, n)}
    for name, value in values.items():
        if value_type(model.model_fields[name]) is dict and isinstance(value, list):
            values[name] = dict(value)
    return values


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
