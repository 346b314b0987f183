"""Options of the ``deltatune`` commands built from dataclass fields, and the error they raise."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from typing import Any


class CliError(Exception):
    """Bad input to a ``deltatune`` command: printed as one line, exit code 2."""


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of a field annotation such as ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def _list_of(inner: Any) -> Any:
    def parse(text: str) -> list[Any]:
        return [inner(x) for x in text.split(",") if x]

    return parse


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is list:
            inner = typing.get_args(tp)[0]
            parser.add_argument(flag, type=_list_of(inner), metavar="A,B", **kw)
        elif typing.get_origin(tp) is dict:
            flag = "--" + f.name.replace("_", "-").removesuffix("s")  # --method-arg k=v, repeatable
            parser.add_argument(flag, type=_key_value, action="append", metavar="KEY=VALUE", **kw)
        else:
            parser.add_argument(flag, type=tp, **kw)


def _options(cls: type, args: argparse.Namespace) -> Any:
    """Dataclass defaults, then the YAML file (--config), then the flags given."""
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    if getattr(args, "config", None):
        import yaml

        if not os.path.isfile(args.config):
            raise CliError(
                f"--config {args.config!r}: no such file; pass a YAML file of option: value lines."
            )
        try:
            with open(args.config, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except UnicodeDecodeError as exc:
            raise CliError(f"--config {args.config}: not UTF-8 text ({exc.reason}).") from exc
        except RecursionError as exc:
            raise CliError(f"--config {args.config}: nested too deeply to read.") from exc
        except yaml.YAMLError as exc:
            raise CliError(f"--config {args.config}: not valid YAML ({exc}).") from exc
        if not isinstance(data, dict):
            raise CliError(f"--config {args.config}: expected a mapping of option: value.")
        if isinstance(data.get("train"), dict):  # a run folder's config.yaml: replay the run
            from deltatune.train.run import options_from_record

            try:
                data = options_from_record(data, names)
            except ValueError as exc:
                raise CliError(f"--config {args.config}: {exc}") from exc
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in names:
                raise CliError(
                    f"--config {args.config}: unknown option {key!r}. Known: {', '.join(sorted(names))}."
                )
            values[name] = value
    for name in names:
        if name in vars(args):
            value = getattr(args, name)
            if name == "method_args":
                value = {**values.get("method_args", {}), **dict(value)}
            values[name] = value
    try:
        return cls(**values)
    except TypeError as exc:  # a YAML value of the wrong kind, e.g. a list where a number goes
        raise CliError(f"--config {args.config}: {exc}") from exc


# -- subcommands ----------------------------------------------------------------------------------
