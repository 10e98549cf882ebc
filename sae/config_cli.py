"""Turn the config dataclasses into a flat command line, with each field's docstring as its help.

`--d-sae 16384` sets `TrainConfig.sae.d_sae`. Flags not given on the command line keep the defaults (or,
on --resume, the checkpoint's values), so `given_flags` reports exactly what the user typed.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from functools import cache
from typing import Any


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal on the line after each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of an annotation like `int`, `float | None`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _parse_optional(kind: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(f"{text!r} is not true or false")
    return text.lower() == "true"


def value_parser(annotation: Any) -> tuple[type, Any]:
    """(scalar type, parser of one value from text) of a field's annotation: "none" is None for optional
    fields, "true"/"false" for booleans."""
    kind, optional = _base_type(annotation)
    if kind is bool:
        return kind, _parse_bool
    return kind, _parse_optional(kind) if optional else kind


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Add one argument group per section of `config_cls` (a dataclass of dataclasses)."""
    hints = typing.get_type_hints(config_cls)
    for section in dataclasses.fields(config_cls):
        section_cls = hints[section.name]
        group = parser.add_argument_group(section.name, (section_cls.__doc__ or "").strip().split("\n")[0])
        section_hints = typing.get_type_hints(section_cls)
        docs = field_docs(section_cls)
        for f in dataclasses.fields(section_cls):
            kind, parse = value_parser(section_hints[f.name])
            default = f.default
            help_text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")  # argparse formats help
            if kind is bool:
                group.add_argument(
                    flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS, help=help_text,
                )
            else:
                group.add_argument(
                    flag(f.name), dest=f.name, type=parse, default=argparse.SUPPRESS,
                    metavar=kind.__name__.upper(), help=help_text,
                )


def given_flags(args: argparse.Namespace, config_cls: type) -> dict[str, dict[str, Any]]:
    """{section: {field: value}} for the config fields present on the command line."""
    hints = typing.get_type_hints(config_cls)
    out: dict[str, dict[str, Any]] = {}
    for section in dataclasses.fields(config_cls):
        for f in dataclasses.fields(hints[section.name]):
            if hasattr(args, f.name):
                out.setdefault(section.name, {})[f.name] = getattr(args, f.name)
    return out


def from_sections(config_cls: type, data: dict[str, dict[str, Any]]):
    """`config_cls` (a dataclass of dataclasses) from {section: {field: value}}; unknown names are errors."""
    from sae.errors import ConfigError

    hints = typing.get_type_hints(config_cls)
    names = [f.name for f in dataclasses.fields(config_cls)]
    unknown = set(data) - set(names)
    if unknown:
        raise ConfigError(f"unknown config sections {sorted(unknown)}; expected {sorted(names)}")
    kwargs = {}
    for name in names:
        values = data.get(name, {})
        bad = set(values) - {f.name for f in dataclasses.fields(hints[name])}
        if bad:
            raise ConfigError(f"unknown fields {sorted(bad)} in config section '{name}'")
        kwargs[name] = hints[name](**values)
    return config_cls(**kwargs)


def build_config(config_cls: type, overrides: dict[str, dict[str, Any]], base: dict | None = None):
    """The config from `base` (a dict of a saved config; default: every section's defaults) with `overrides`."""
    hints = typing.get_type_hints(config_cls)
    if base is None:
        base = {f.name: dataclasses.asdict(hints[f.name]()) for f in dataclasses.fields(config_cls)}
    data = {name: dict(values) for name, values in base.items()}
    for section, values in overrides.items():
        data[section].update(values)
    return from_sections(config_cls, data)
