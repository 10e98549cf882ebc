"""Turn the config dataclasses into a flat command line, with each field's docstring as its help.

`--d-sae 16384` sets `TrainConfig.sae.d_sae`. Flags not given on the command line keep the defaults (or,
on --resume, the checkpoint's values), so `given_flags` reports exactly what the user typed. A field without
a default is a required flag; a mode field, annotated `Literal[...]`, takes only its values (argparse choices).
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


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(scalar type or Literal, optional?) of an annotation like `int`, `float | None`, `Literal["a", "b"]`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def choices(annotation: Any) -> tuple[Any, ...] | None:
    """The valid values of a mode field (annotated `Literal[...]`, or `Literal[...] | None`); None for others."""
    kind, _ = _base_type(annotation)
    return typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None


def _parse_optional(kind: Any):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(f"{text!r} is not true or false")
    return text.lower() == "true"


def _parse_choice(values: tuple[Any, ...]):
    by_text = {str(v): v for v in values}

    def parse(text: str):
        if text not in by_text:
            raise ValueError(f"{text!r} is not one of {values}")
        return by_text[text]

    parse.__name__ = "choice"
    return parse


def value_parser(annotation: Any) -> tuple[type, Any]:
    """(scalar type, parser of one value from text) of a field's annotation: "none" is None for optional
    fields, "true"/"false" for booleans; a Literal field's parser accepts only its values (ValueError naming
    them otherwise)."""
    kind, optional = _base_type(annotation)
    values = choices(annotation)
    if values is not None:
        kind = type(values[0])
        parse = _parse_choice(values)
        return kind, _parse_optional(parse) if optional else parse
    if kind is bool:
        return kind, _parse_bool
    return kind, _parse_optional(kind) if optional else kind


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    """A field's default value; dataclasses.MISSING when the field is required."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Add one argument group per section of `config_cls` (a dataclass of dataclasses).

    A field without a default is a required flag; a `Literal[...]` field takes one of its values (argparse
    `choices`: --help lists them, and the parser refuses any other naming them).
    """
    hints = typing.get_type_hints(config_cls)
    for section in dataclasses.fields(config_cls):
        section_cls = hints[section.name]
        group = parser.add_argument_group(section.name, (section_cls.__doc__ or "").strip().split("\n")[0])
        section_hints = typing.get_type_hints(section_cls)
        docs = field_docs(section_cls)
        for f in dataclasses.fields(section_cls):
            kind, parse = value_parser(section_hints[f.name])
            default = _default(f)
            required = default is dataclasses.MISSING
            note = "(required)" if required else f"(default: {default})"
            help_text = f"{docs.get(f.name, '')} {note}".replace("%", "%%")  # argparse formats help
            if kind is bool:
                group.add_argument(
                    flag(f.name),
                    dest=f.name,
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    required=required,
                    help=help_text,
                )
                continue
            values = choices(section_hints[f.name])
            if values is not None:
                # The plain value type, so that argparse itself refuses an unknown value, naming the valid ones.
                optional = _base_type(section_hints[f.name])[1]
                parse = _parse_optional(kind) if optional else kind
                values = (*values, None) if optional else values
            group.add_argument(
                flag(f.name),
                dest=f.name,
                type=parse,
                default=argparse.SUPPRESS,
                required=required,
                choices=values,
                metavar=None if values is not None else kind.__name__.upper(),
                help=help_text,
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
    """The config from `base` (a dict of a saved config; default: every section's defaults) with `overrides`,
    which must give every field that has no default."""
    hints = typing.get_type_hints(config_cls)
    if base is None:
        base = {
            section.name: {
                f.name: _default(f)
                for f in dataclasses.fields(hints[section.name])
                if _default(f) is not dataclasses.MISSING
            }
            for section in dataclasses.fields(config_cls)
        }
    data = {name: dict(values) for name, values in base.items()}
    for section, values in overrides.items():
        data[section].update(values)
    return from_sections(config_cls, data)
