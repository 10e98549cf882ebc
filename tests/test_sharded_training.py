"""The Trainer with its latents split over ranks under torchrun (gloo, 2 and 3 processes: shards of 5, 5 and of
4, 4, 2 latents) against the one-process Trainer on the same global batches: the same figures every step and the
same SAE, saved with torch.distributed.checkpoint and exported whole; resumed on 1, 2 and 3 ranks, and after a
rank was killed with SIGKILL.

Tolerance: the ranks sum the reconstruction and the gradient norm in another order than one process, so each
figure and parameter may differ by the rounding of a sum of max(B, D, F) fp32 terms, compounded over the six
steps' updates: rtol = atol = 6 * max(B, D, F) * eps32 (about 2.3e-5; seen: below 2.5e-7).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae import checkpoint as ckpt
from sae.distributed.checkpoint import load_sharded
from sae.distributed.layout import latent_slice
from sae.distributed.mesh import Mesh
from sae.errors import ConfigError
from sae.trainer import Trainer
from tests.sharded_trainer_worker import BATCH, D_IN, D_SAE, config, source, step_figures
from tests.torchrun import torchrun

WORKER = Path(__file__).with_name("sharded_trainer_worker.py")
STEPS = 6
TOL = 6 * max(BATCH, D_IN, D_SAE) * torch.finfo(torch.float32).eps


def train_in_process(out_dir: Path, resume: Path | None = None) -> tuple[Trainer, list[dict]]:
    trainer = Trainer(config(out_dir, STEPS), source(), resume=resume, progress=False)
    figures = []
    while not trainer.done:
        trainer.fit_step()
        figures.append(step_figures(trainer))
    return trainer, figures


def assert_same_figures(got: list[dict], want: list[dict]) -> None:
    assert [g["step"] for g in got] == [w["step"] for w in want]
    for g, w in zip(got, want):
        assert g["l0"] == w["l0"] and g["dead_fraction"] == w["dead_fraction"], (g, w)
        for key in ("loss", "mse", "explained_variance", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=TOL, abs=TOL), (key, g, w)


def assert_same_export(folder: Path, want: Path) -> None:
    """The whole export of a sharded run, read with safetensors alone, equals the one-process export."""
    got, ref = load_file(str(folder / ckpt.WEIGHTS_FILE)), load_file(str(want / ckpt.WEIGHTS_FILE))
    assert sorted(got) == sorted(ref) == sorted(ckpt.PARAM_NAMES)
    for name in ref:
        assert got[name].dtype == ref[name].dtype and got[name].shape == ref[name].shape, name
        torch.testing.assert_close(got[name], ref[name], rtol=TOL, atol=TOL, msg=name)
    cfg = json.loads((folder / ckpt.CFG_FILE).read_text())
    assert (cfg["d_in"], cfg["d_sae"]) == (D_IN, D_SAE)


def ranks_figures(run: Path, world: int) -> list[dict]:
    figures = [json.loads((run / f"losses_rank{r}.json").read_text()) for r in range(world)]
    assert all(f == figures[0] for f in figures), "the ranks disagree on the run's figures"
    return figures[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A one-process run and the same run on 2 ranks, each checkpointed at steps 3 and 6."""
    root = tmp_path_factory.mktemp("sharded-training")
    _, single = train_in_process(root / "one")
    torchrun(2, WORKER, str(root / "two"), str(STEPS))
    return root, single


def step(run: Path, n: int) -> Path:
    return run / "checkpoints" / f"step_{n:09d}"


def test_two_ranks_train_the_same_sae_as_one_process(runs):
    root, single = runs
    assert_same_figures(ranks_figures(root / "two", 2), single)
    for n in (3, STEPS):
        assert_same_export(step(root / "two", n), step(root / "one", n))
    # The training state (DCP) read back whole in one process: every parameter and Adam moment.
    state = load_sharded(step(root / "two", STEPS), Mesh.single(), latent_slice(D_SAE, 1, 0)).tensors
    want = ckpt.load_training_state(step(root / "one", STEPS)).tensors
    for key, value in want.items():
        if key.startswith(("param.", "optim.")) and not key.endswith(".step"):
            torch.testing.assert_close(state[key], value, rtol=TOL, atol=TOL, msg=key)
    assert torch.equal(state["tokens_since_fired"], want["tokens_since_fired"])
    assert (root / "two" / "metrics.jsonl").read_text().count("\n") == STEPS  # rank 0 alone logs


def test_a_two_rank_checkpoint_resumes_on_one_process(runs, tmp_path):
    root, single = runs
    _, figures = train_in_process(tmp_path / "on-one", resume=step(root / "two", 3))
    assert_same_figures(figures, single[3:])
    assert_same_export(step(tmp_path / "on-one", STEPS), step(root / "one", STEPS))


def test_a_two_rank_checkpoint_resumes_on_three_ranks(runs, tmp_path):
    root, single = runs
    torchrun(3, WORKER, str(tmp_path / "on-three"), str(STEPS), str(step(root / "two", 3)))
    assert_same_figures(ranks_figures(tmp_path / "on-three", 3), single[3:])
    assert_same_export(step(tmp_path / "on-three", STEPS), step(root / "one", STEPS))


def test_a_run_killed_with_sigkill_resumes_with_the_identical_losses(runs, tmp_path):
    """Rank 1 is killed after step 5 (checkpointed at 3); the run resumed on 2 ranks repeats steps 4 to 6 with
    exactly the figures of the uninterrupted 2-rank run (same ranks, same order of every sum)."""
    root, _ = runs
    killed = torchrun(2, WORKER, str(tmp_path / "killed"), str(STEPS), "-", "5", check=False)
    assert killed.returncode != 0
    assert ckpt.find_checkpoint(tmp_path / "killed").name == "step_000000003"
    assert not list((tmp_path / "killed" / "checkpoints").glob(".tmp-*"))
    torchrun(2, WORKER, str(tmp_path / "killed"), str(STEPS), str(tmp_path / "killed"))
    assert ranks_figures(tmp_path / "killed", 2) == ranks_figures(root / "two", 2)[3:]


def test_an_incomplete_sharded_checkpoint_is_refused(runs, tmp_path):
    import shutil

    root, _ = runs
    broken = tmp_path / "broken"
    shutil.copytree(step(root / "two", 3), broken)
    (broken / ckpt.SHARDED_STATE_DIR / ".metadata").unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete: .* has no .metadata"):
        ckpt.resume_checkpoint(broken)


def test_a_world_that_cannot_split_the_latents_is_refused_before_any_work(runs, monkeypatch, tmp_path):
    """10 latents over 6 ranks: ceil(10 / 6) = 2 per rank leaves the last rank none; a new run and a 2-rank
    checkpoint resumed on 6 ranks (resharding impossible) are refused alike, naming widths that work."""
    root, _ = runs
    monkeypatch.setattr("sae.trainer.check_same_config", lambda mesh, cfg: None)  # no peers to compare with
    six = Mesh(0, 6, None, torch.device("cpu"), 1.0)
    for resume in (None, step(root / "two", 3)):
        with pytest.raises(ConfigError, match="d_sae 10 cannot be split over 6 ranks: .* or fewer ranks"):
            Trainer(config(tmp_path / "six", STEPS), source(), resume=resume, progress=False, mesh=six)
