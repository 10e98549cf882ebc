"""The trainer on a synthetic resumable source: learning, recipe invariants, folding, resume, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kernels import reference as R
from sae import checkpoint as ckpt
from sae.config import ConfigError, ObjectiveConfig, OptimConfig, RunConfig, SAEConfig, TrainConfig
from sae.trainer import Trainer
from tests.synthetic import SyntheticActivations


def small_config(out_dir: Path, steps: int = 40, **run) -> TrainConfig:
    return TrainConfig(
        sae=SAEConfig(d_sae=96, init_l0=16.0),
        objective=ObjectiveConfig(sparsity="target_l0", target_l0=6.0, sparsity_warmup_steps=10),
        optim=OptimConfig(lr=3e-3, lr_warmup_steps=5, batch_size=64),
        run=RunConfig(
            steps=steps, out_dir=str(out_dir), device="cpu", log_every=1, checkpoint_every=10, init_batches=2, **run
        ),
    )


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_learns_and_keeps_the_decoder_unit_norm(tmp_path):
    cfg = small_config(tmp_path / "run", steps=150)
    trainer = Trainer(cfg, SyntheticActivations(), progress=False)
    summary = trainer.fit()
    log = metrics(tmp_path / "run")
    assert len(log) == 150
    first, last = log[:10], log[-10:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "reconstruction") < 0.5 * mean(first, "reconstruction")
    assert mean(last, "explained_variance") > mean(first, "explained_variance")
    assert abs(mean(last, "l0") - 6.0) < abs(mean(first, "l0") - 6.0)  # L0 moves towards its target
    norms = trainer.model.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-6)
    assert (trainer.model.threshold > 0).all()
    assert summary.step == 150 and summary.checkpoint.name == "step_000000150"


def test_decoder_gradient_is_projected_orthogonal_to_each_row(tmp_path):
    trainer = Trainer(small_config(tmp_path / "run"), SyntheticActivations(), progress=False)
    model = trainer.model
    x = trainer.batches.peek(1)[0] * trainer.scale
    R_out = model(x)
    (R_out.x_hat.pow(2).sum() + R_out.l0.sum()).backward()
    model.project_decoder_grad()
    grad = model.W_dec.grad
    assert grad.abs().sum() > 0
    # What is left parallel to each unit row, relative to the row's gradient: fp32 rounding only
    # (eps 1.2e-7 times a sum over d_in = 24 terms).
    cosine = (grad * model.W_dec).sum(dim=1) / grad.norm(dim=1).clamp_min(1e-30)
    assert cosine.abs().max() < 24 * 1.2e-7 * 4


def test_saved_sae_on_raw_activations_matches_the_trained_one_in_scaled_space(tmp_path):
    source = SyntheticActivations(scale=40.0)
    trainer = Trainer(small_config(tmp_path / "run", steps=20), source, progress=False)
    summary = trainer.fit()
    assert abs(trainer.scale - 1.0) > 0.1  # the test means something only when the scale is not 1
    # Anyone can load the folder with safetensors alone; the weights act on raw activations.
    weights = load_file(str(summary.checkpoint / "sae_weights.safetensors"))
    cfg = json.loads((summary.checkpoint / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["normalize_activations"] == "none"
    assert weights["W_enc"].shape == (24, 96) and weights["W_dec"].shape == (96, 24)
    x_raw = source.batch(1000)
    raw = R.sae_forward(
        x_raw, weights["W_enc"], weights["b_enc"], weights["W_dec"], weights["b_dec"], weights["threshold"], 0.001
    )
    with torch.no_grad():
        scaled = trainer.model(x_raw * trainer.scale)
    torch.testing.assert_close(raw.x_hat, scaled.x_hat / trainer.scale, rtol=1e-5, atol=1e-5 * x_raw.abs().max())
    torch.testing.assert_close(raw.l0, scaled.l0)


class Interrupt(Exception):
    pass


def fit_until_crash(trainer: Trainer, step: int, error: type[BaseException]) -> None:
    """Run trainer.fit() with `error` raised inside the step that would follow `step`."""
    real_step = trainer.train_step

    def crashing_step(x):
        if trainer.step == step:
            raise error
        return real_step(x)

    trainer.train_step = crashing_step
    with pytest.raises(error):
        trainer.fit()


def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_losses(tmp_path):
    full = Trainer(small_config(tmp_path / "full"), SyntheticActivations(), progress=False)
    full.fit()

    # Crash after step 27: the last checkpoint is step 20; steps 21..27 are lost and must be redone.
    broken = Trainer(small_config(tmp_path / "broken"), SyntheticActivations(), progress=False)
    fit_until_crash(broken, 27, Interrupt)
    assert ckpt.find_checkpoint(tmp_path / "broken").name == "step_000000020"

    resumed = Trainer(
        small_config(tmp_path / "broken"), SyntheticActivations(), progress=False, resume=tmp_path / "broken"
    )
    assert resumed.step == 20
    resumed.fit()
    keys = ("loss", "reconstruction", "sparsity", "l0", "explained_variance", "grad_norm", "lr")
    expected = [{k: r[k] for k in ("step", *keys)} for r in metrics(tmp_path / "full")]
    got = [{k: r[k] for k in ("step", *keys)} for r in metrics(tmp_path / "broken")]
    assert got == expected  # bit for bit, including the log lines of the redone steps
    for name in ("W_enc", "W_dec", "threshold", "b_enc", "b_dec"):
        assert torch.equal(getattr(full.model, name), getattr(resumed.model, name)), name


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    trainer = Trainer(small_config(tmp_path / "run"), SyntheticActivations(), progress=False)
    fit_until_crash(trainer, 13, KeyboardInterrupt)
    assert ckpt.find_checkpoint(tmp_path / "run").name == "step_000000013"


@pytest.fixture
def saved_run(tmp_path) -> Path:
    Trainer(small_config(tmp_path / "run", steps=10), SyntheticActivations(), progress=False).fit()
    return tmp_path / "run"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: (c / "sae_weights.safetensors").write_bytes(b"\x00" * 20), "corrupt"),
        (lambda c: (c / "training_state.safetensors").unlink(), "missing"),
        (lambda c: (c / "training_state.json").write_text("{not json"), "corrupt"),
        (lambda c: (c / "cfg.json").write_text(json.dumps({"d_in": 24, "d_sae": 50})), "shape"),
    ],
)
def test_a_damaged_checkpoint_is_refused_with_its_problem_named(saved_run, damage, message):
    folder = ckpt.find_checkpoint(saved_run)
    damage(folder)
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.load_sae_weights(folder)
        ckpt.load_training_state(folder)


def test_resume_with_an_incompatible_config_is_refused(saved_run):
    cfg = small_config(saved_run, steps=20)
    cfg.sae.d_sae = 128
    with pytest.raises(ckpt.CheckpointError, match="d-sae"):
        Trainer(cfg, SyntheticActivations(), progress=False, resume=saved_run)


def test_a_new_run_will_not_overwrite_an_old_one(saved_run):
    with pytest.raises(ckpt.CheckpointError, match="--resume"):
        Trainer(small_config(saved_run), SyntheticActivations(), progress=False)


def test_interrupted_checkpoint_write_leaves_the_previous_checkpoint_loadable(saved_run, monkeypatch):
    before = ckpt.find_checkpoint(saved_run)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_json", fail)
    trainer = Trainer(small_config(saved_run, steps=20), SyntheticActivations(), progress=False, resume=saved_run)
    with pytest.raises(OSError):
        trainer.fit()
    monkeypatch.undo()
    assert ckpt.find_checkpoint(saved_run) == before
    ckpt.load_sae_weights(before)
    ckpt.load_training_state(before)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ObjectiveConfig(target_l0=0), "target-l0"),
        (lambda: ObjectiveConfig(sparsity="l1"), "sparsity"),
        (lambda: SAEConfig(d_sae=0), "d-sae"),
        (lambda: SAEConfig(threshold_init=0.0), "threshold-init"),
        (lambda: OptimConfig(batch_size=0), "batch-size"),
        (lambda: RunConfig(steps=0), "steps"),
    ],
)
def test_configs_that_cannot_work_are_refused(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_a_target_l0_at_or_above_the_width_is_refused(tmp_path):
    cfg = small_config(tmp_path / "run")
    cfg.objective.target_l0 = 96
    with pytest.raises(ConfigError, match="target-l0"):
        Trainer(cfg, SyntheticActivations(), progress=False)


def test_gemma_scope_l0_objective_trains(tmp_path):
    cfg = small_config(tmp_path / "run", steps=30)
    cfg.objective = ObjectiveConfig(sparsity="l0", l0_coefficient=0.05, sparsity_warmup_steps=5)
    trainer = Trainer(cfg, SyntheticActivations(), progress=False)
    trainer.fit()
    log = metrics(tmp_path / "run")
    assert log[-1]["l0"] < log[0]["l0"]
    assert log[-1]["sparsity"] == pytest.approx(0.05 * log[-1]["l0"], rel=1e-6)
