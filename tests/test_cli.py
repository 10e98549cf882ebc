"""The command line generated from the config dataclasses."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from sae.__main__ import _parser, main
from sae.config import TrainConfig
from sae.config_cli import build_config, field_docs, given_flags


def sections():
    hints = typing.get_type_hints(TrainConfig)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(TrainConfig)]


def test_every_config_field_has_a_docstring_and_a_unique_flag():
    seen: dict[str, str] = {}
    for section, cls in sections():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            assert f.name not in seen, f"--{f.name} is in both {seen[f.name]} and {section}"
            seen[f.name] = section


def test_help_lists_sections_and_field_docs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for section, cls in sections():
        assert f"\n{section}:" in text
    assert "--target-l0" in text and "Target mean L0" in text
    assert "--resume" in text


def test_flags_override_only_what_was_given():
    args = _parser().parse_args(
        ["train", "--d-sae", "64", "--target-l0", "8", "--no-exclude-special-tokens", "--init-l0", "none"]
    )
    given = given_flags(args, TrainConfig)
    assert given == {
        "data": {"exclude_special_tokens": False},
        "sae": {"d_sae": 64, "init_l0": None},
        "objective": {"target_l0": 8.0},
    }
    cfg = build_config(TrainConfig, given)
    assert cfg.sae.d_sae == 64 and cfg.sae.init_l0 is None and cfg.objective.target_l0 == 8.0
    assert cfg.optim == TrainConfig().optim


def test_a_bad_flag_value_is_an_error_not_a_traceback(capsys):
    assert main(["train", "--target-l0", "-3"]) == 2
    assert "--target-l0 must be > 0" in capsys.readouterr().err
