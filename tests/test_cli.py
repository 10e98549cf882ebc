"""The command line generated from the config dataclasses."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from sae.__main__ import _parser, main
from sae.config import ConfigError, TrainConfig
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
    for section, _ in sections():
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


def test_mode_fields_are_literals_whose_values_the_parser_lists_and_checks(capsys):
    from sae.config_cli import choices

    hints = {f.name: typing.get_type_hints(cls)[f.name] for _, cls in sections() for f in dataclasses.fields(cls)}
    assert choices(hints["sparsity"]) == ("l0", "target_l0")
    assert choices(hints["compute_dtype"]) == ("auto", "float32", "bfloat16", "float16")
    assert choices(hints["model_dtype"]) == ("auto", "float32", "bfloat16", "float16")
    assert choices(hints["b_dec_init"]) == ("zeros", "mean") and choices(hints["backend"])
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--compute-dtype {auto,float32,bfloat16,float16}" in capsys.readouterr().out
    args = _parser().parse_args(["train", "--sparsity", "l0", "--model-dtype", "bfloat16"])
    assert given_flags(args, TrainConfig) == {"model": {"model_dtype": "bfloat16"}, "objective": {"sparsity": "l0"}}
    for flag, value in (("--sparsity", "L1"), ("--b-dec-init", "ones"), ("--model-dtype", "fp16")):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", flag, value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: invalid choice: '{value}'" in err, err


def test_mode_values_are_checked_by_the_configs_too():
    from harvest.config import ModelConfig
    from harvest.errors import HarvestError
    from sae.config import ObjectiveConfig, SAEConfig

    with pytest.raises(ConfigError, match="--sparsity must be one of"):
        ObjectiveConfig(sparsity="L1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--b-dec-init must be one of"):
        SAEConfig(b_dec_init="ones")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--compute-dtype must be auto or one of"):
        SAEConfig(compute_dtype="fp16")  # type: ignore[arg-type]
    with pytest.raises(HarvestError, match="model_dtype='fp16' is not supported"):
        ModelConfig(model_dtype="fp16")  # type: ignore[arg-type]


def test_a_required_field_is_a_required_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["select", "--seeds", "s.txt", "--pool", "icd10-cm", "--out", "runs/x"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --token-budget" in capsys.readouterr().err


def test_harvest_imports_nothing_of_sae():
    """The layers are bench -> sae -> {harvest, kernels}: nothing in harvest, its old command included, imports sae."""
    code = (
        "import sys, harvest, harvest.__main__, harvest.select; "
        "assert not [m for m in sys.modules if m == 'sae' or m.startswith('sae.')], sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_the_saekit_console_script_runs_the_sae_command_line(capsys, monkeypatch):
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "saekit"]
    assert script.value == "sae.__main__:main"
    monkeypatch.setattr("sys.argv", ["/usr/bin/saekit", "train", "--help"])
    with pytest.raises(SystemExit) as done:
        script.load()()
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: saekit train")
