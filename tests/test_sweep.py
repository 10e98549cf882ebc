"""Several SAEs from one harvest: each member trains exactly as its solo run would, on one LM forward."""

from __future__ import annotations

import dataclasses
import json

import pytest

from harvest import forward
from sae.__main__ import main
from sae.config import TrainConfig
from sae.errors import ConfigError
from sae.sweep import Sweep, members, parse_grid
from sae.trainer import Trainer
from tests.test_train_live import harvester, live_config, live_flags, losses


def test_parse_grid_types_and_errors():
    grid = parse_grid(["target_l0=4,8", "--layer=1,3", "lr=1e-3", "d-sae=none,64"])
    assert grid == {"target_l0": [4.0, 8.0], "layer": [1, 3], "lr": [1e-3], "d_sae": [None, 64]}
    for spec, message in [
        ("batch_size=16,32", "sweepable"),
        ("context_size=8,16", "sweepable"),
        ("target_l0", "FIELD=V1,V2"),
        ("target_l0=4,4", "repeats"),
        ("layer=a", "layer=a"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_grid([spec])
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["layer=1", "layer=2"])
    with pytest.raises(ConfigError, match="at least one"):
        parse_grid([])


def test_a_grid_over_a_mode_takes_only_its_values():
    assert parse_grid(["sparsity=l0,target_l0", "compute_dtype=float32,auto"]) == {
        "sparsity": ["l0", "target_l0"],
        "compute_dtype": ["float32", "auto"],
    }
    with pytest.raises(ConfigError, match=r"sparsity=l0,L1.*'L1' is not one of \('l0', 'target_l0'\)"):
        parse_grid(["sparsity=l0,L1"])


def test_members_are_the_combinations(tmp_path):
    base = dataclasses.replace(TrainConfig(), run=dataclasses.replace(TrainConfig().run, out_dir=str(tmp_path)))
    out = members(base, {"layer": [1, 3], "target_l0": [4.0, 8.0]})
    assert [name for name, _ in out] == [
        "layer=1_target_l0=4.0",
        "layer=1_target_l0=8.0",
        "layer=3_target_l0=4.0",
        "layer=3_target_l0=8.0",
    ]
    assert [(c.model.layer, c.objective.target_l0) for _, c in out] == [(1, 4.0), (1, 8.0), (3, 4.0), (3, 8.0)]
    assert out[2][1].run.out_dir == str(tmp_path / "layer=3_target_l0=4.0")


def count_forwards(monkeypatch) -> list[int]:
    calls = []
    real = forward.layer_activations

    def counting(model, layers, *args):
        calls.append(1)
        return real(model, layers, *args)

    monkeypatch.setattr(forward, "layer_activations", counting)
    return calls


def test_each_member_trains_as_its_solo_run_from_one_forward(tiny_model, text_file, tmp_path, monkeypatch):
    base = live_config(tiny_model, text_file, tmp_path / "sweep")
    base = dataclasses.replace(base, run=dataclasses.replace(base.run, steps=6, checkpoint_every=3))
    calls = count_forwards(monkeypatch)
    sweep = Sweep(base, {"layer": [1, 3], "target_l0": [4.0, 8.0]}, progress=False)
    sweep.fit()
    sweep_forwards = len(calls)
    for name, cfg in sweep.members:
        if cfg.objective.target_l0 == 8.0 and cfg.model.layer == 1:
            calls.clear()
        solo_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(tmp_path / "solo" / name)))
        Trainer(solo_cfg, harvester(solo_cfg), progress=False).fit()
        if cfg.objective.target_l0 == 8.0 and cfg.model.layer == 1:
            solo_forwards = len(calls)
        assert losses(tmp_path / "sweep" / name) == losses(tmp_path / "solo" / name), name
    assert sweep_forwards == solo_forwards  # four SAEs, two layers, for the forwards of one


def test_sweep_resumes_as_one(tiny_model, text_file, tmp_path):
    base = live_config(tiny_model, text_file, tmp_path / "full")
    base = dataclasses.replace(base, run=dataclasses.replace(base.run, steps=8, checkpoint_every=3))
    grid = {"layer": [1, 3]}
    Sweep(base, grid, progress=False).fit()
    broken_cfg = dataclasses.replace(base, run=dataclasses.replace(base.run, out_dir=str(tmp_path / "broken")))
    broken = Sweep(broken_cfg, grid, progress=False)
    for _ in range(4):  # a checkpoint at step 3, then one step lost
        for trainer in broken.trainers:
            trainer.fit_step()
    broken.harvester.close()
    Sweep(broken_cfg, grid, resume=True, progress=False).fit()
    for name, _ in members(base, grid):
        assert losses(tmp_path / "broken" / name) == losses(tmp_path / "full" / name)


def test_cli_sweep_and_resume(tiny_model, text_file, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["sweep", "--grid", "target_l0=4,8", *live_flags(tiny_model, text_file, steps=4, out_dir=out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "2 SAEs from one harvest" in text and "target_l0=8.0" in text
    assert (out / "sweep.json").is_file()
    assert (out / "target_l0=4.0" / "checkpoints" / "step_000000004").is_dir()
    assert main(["sweep", "--resume", str(out), "--steps", "6", "--no-progress"]) == 0
    assert (out / "target_l0=8.0" / "checkpoints" / "step_000000006").is_dir()
    assert main(["sweep", "--grid", "batch_size=8,16", "--out-dir", str(tmp_path / "x")]) == 2
    assert "sweepable" in capsys.readouterr().err


def test_a_diverging_member_stops_alone_and_the_others_train_as_their_solo_runs(tiny_model, text_file, tmp_path):
    base = live_config(tiny_model, text_file, tmp_path / "sweep")
    base = dataclasses.replace(base, run=dataclasses.replace(base.run, steps=6, checkpoint_every=2))
    grid = {"lr": [base.optim.lr, 1e6]}
    sweep = Sweep(base, grid, progress=False)
    sweep.fit()
    (good, good_cfg), (bad, _) = sweep.members
    assert list(sweep.stopped) == [bad] and "not finite" in sweep.stopped[bad]
    spec = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert list(spec["stopped"]) == [bad]
    solo_cfg = dataclasses.replace(good_cfg, run=dataclasses.replace(good_cfg.run, out_dir=str(tmp_path / "solo")))
    Trainer(solo_cfg, harvester(solo_cfg), progress=False).fit()
    assert losses(tmp_path / "sweep" / good) == losses(tmp_path / "solo")  # not corrupted by the other
    longer = dataclasses.replace(base, run=dataclasses.replace(base.run, steps=8))
    resumed = Sweep(longer, grid, resume=True, progress=False)  # the stopped member is left out
    assert resumed.trainers[1] is None
    resumed.fit()
    assert (tmp_path / "sweep" / good / "checkpoints" / "step_000000008").is_dir()
