"""`torchrun -m sae sweep` on 2 gloo ranks from the tiny live model: each rank harvests its share of the documents
and every member trains on the gathered global batch, either whole on one rank (--placement members) or with its
latents split over both (--placement latents). The two placements train the same SAEs (the same global batches,
the same init; the latent split sums in another order: fp32 rule of tests/test_sharded_training.py), and a members
sweep stopped and resumed continues with the identical losses."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_live import live_flags
from tests.torchrun import torchrun

MEMBERS = ("target_l0=8.0", "target_l0=12.0")
TOL = 6 * 64 * torch.finfo(torch.float32).eps * 6  # max(B, D, F) = 64 latents, six steps


def sweep(tiny_model, text_file, out, *extra):
    flags = live_flags(tiny_model, text_file, out_dir=out, log_every=1, checkpoint_every=3, steps=6)
    return torchrun(2, "-m", "sae", "sweep", "--grid", "target_l0=8,12", *flags, "--adam-beta1", "0.9", *extra,
                    timeout=300)  # fmt: skip


def losses(folder) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def members_run(tiny_model, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "members"
    run = sweep(tiny_model, text_file, out, "--placement", "members")
    return out, run


def test_members_are_placed_on_ranks_and_every_member_trains(members_run):
    out, run = members_run
    assert "members placed over 2 ranks" in run.stdout and run.stdout.count("done: 6 steps") == 1
    assert "trained on rank 1" in run.stdout  # rank 0 reports the member rank 1 trained
    spec = json.loads((out / "sweep.json").read_text())
    assert spec["placement"] == "members" and spec["world_size"] == 2
    for name in MEMBERS:
        folder = out / name / "checkpoints" / "step_000000006"
        info = json.loads((folder / "training_state.json").read_text())
        assert info["data_position"]["world"] == 2  # whichever rank saved it holds every rank's position
        assert len(losses(out / name)) == 6


def test_latent_placement_trains_the_same_saes_as_member_placement(members_run, tiny_model, text_file, tmp_path):
    out, _ = members_run
    run = sweep(tiny_model, text_file, tmp_path / "latents", "--placement", "latents")
    assert "latents placed over 2 ranks" in run.stdout
    for name in MEMBERS:
        folder = tmp_path / "latents" / name / "checkpoints" / "step_000000006"
        assert json.loads((folder / "training_state.json").read_text())["sharded"] == {"world": 2}
        got = load_file(str(folder / "sae_weights.safetensors"))
        want = load_file(str(out / name / "checkpoints" / "step_000000006" / "sae_weights.safetensors"))
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=TOL, atol=TOL, msg=f"{name} {key}")


def test_a_members_sweep_resumed_continues_the_identical_losses(members_run, tiny_model, text_file, tmp_path):
    out, _ = members_run
    stopped = tmp_path / "stopped"
    flags = live_flags(tiny_model, text_file, out_dir=stopped, log_every=1, checkpoint_every=3, steps=3)
    torchrun(2, "-m", "sae", "sweep", "--grid", "target_l0=8,12", *flags, "--adam-beta1", "0.9", timeout=300)
    torchrun(2, "-m", "sae", "sweep", "--resume", str(stopped), "--steps", "6", "--no-progress", timeout=300)
    for name in MEMBERS:
        assert losses(stopped / name) == losses(out / name)
