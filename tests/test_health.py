"""A run that goes wrong says so: non-finite values stop it or skip the batch, nothing non-finite is saved."""

from __future__ import annotations

import re
import time

import pytest
import torch

from sae import checkpoint as ckpt
from sae.health import LossWatch, TrainingHealthError
from sae.trainer import Trainer
from tests.synthetic import SyntheticActivations
from tests.test_training import metrics, small_config


class Poisoned(SyntheticActivations):
    """Synthetic batches, with NaN planted in one token of each batch listed in `bad`."""

    def __init__(self, bad: set[int], **kw):
        super().__init__(**kw)
        self.bad = bad

    def batch(self, index: int) -> torch.Tensor:
        b = super().batch(index)
        if index in self.bad:
            b[3, 5] = float("nan")
        return b


def test_a_diverging_learning_rate_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    Trainer(small_config(run, steps=10), SyntheticActivations(), progress=False).fit()
    good = ckpt.find_checkpoint(run)
    weights, _ = ckpt.load_sae_weights(good)
    cfg = small_config(run, steps=40)
    cfg.optim.lr = 1e6  # a mistyped learning rate, changed on resume
    with pytest.raises(TrainingHealthError) as err:
        Trainer(cfg, SyntheticActivations(), progress=False, resume=run).fit()
    message = str(err.value)
    assert "not finite" in message and "--lr" in message and str(good) in message, message
    assert re.search(r"stopped at step 1\d: the (loss|gradient norm) is", message), message  # after step 10
    assert ckpt.find_checkpoint(run) == good  # nothing newer was written
    again, _ = ckpt.load_sae_weights(good)
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    ckpt.load_training_state(good)


def test_a_non_finite_batch_stops_the_run_by_default(tmp_path):
    trainer = Trainer(small_config(tmp_path / "run", steps=20), Poisoned({6}), progress=False)
    with pytest.raises(TrainingHealthError, match="step 7: the loss is nan"):
        trainer.fit()
    assert trainer.step == 6  # the bad step applied nothing


def test_skip_drops_bad_batches_up_to_the_limit(tmp_path):
    cfg = small_config(tmp_path / "run", steps=20, on_nonfinite="skip", max_skipped_batches=2)
    trainer = Trainer(cfg, Poisoned({6, 9}), progress=False)
    before = {}

    real = trainer.train_step

    def watch(x):
        before[trainer.step] = trainer.model.W_enc.detach().clone()
        return real(x)

    trainer.train_step = watch
    summary = trainer.fit()
    assert summary.step == 20 and trainer.skipped_batches == 2
    log = metrics(tmp_path / "run")
    assert log[-1]["skipped_batches"] == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert 7 not in [r["step"] for r in log]  # a skipped step has no figures to log
    assert next(r for r in log if r["skipped_batches"] == 1)["step"] == 8
    assert torch.equal(before[6], before[7])  # the skipped step (the 7th) left the SAE as it was
    too_many = small_config(tmp_path / "many", steps=20, on_nonfinite="skip", max_skipped_batches=2)
    with pytest.raises(TrainingHealthError, match=r"after 2 skipped batches"):
        Trainer(too_many, Poisoned({3, 4, 5}), progress=False).fit()


def test_no_checkpoint_holding_a_non_finite_value_is_written(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(small_config(run, steps=10), SyntheticActivations(), progress=False)
    trainer.fit()
    good = ckpt.find_checkpoint(run)
    with torch.no_grad():
        trainer.model.threshold[4] = float("inf")
    trainer.step += 1
    with pytest.raises(TrainingHealthError, match="parameter threshold"):
        trainer.save_checkpoint()
    assert ckpt.find_checkpoint(run) == good


def test_the_loss_watch_warns_once_per_sustained_explosion():
    watch = LossWatch(factor=10.0, patience=5)
    assert [watch.update(s, 1.0) for s in range(50)] == [None] * 50
    assert [watch.update(s, 100.0) for s in range(4)] == [None] * 4  # a blip is not an explosion
    assert watch.update(4, 1.0) is None
    alerts = [watch.update(s, 100.0) for s in range(10)]
    assert sum(a is not None for a in alerts) == 1 and "diverging" in alerts[4]
    assert watch.exploding
    watch.update(99, 1.0)
    assert not watch.exploding


class Slow(SyntheticActivations):
    def __iter__(self):
        for b in super().__iter__():
            time.sleep(0.05)
            yield b


def test_progress_reports_the_run_rate_and_the_time_spent_waiting_for_activations(tmp_path):
    trainer = Trainer(small_config(tmp_path / "run", steps=12), Slow(), progress=False)
    trainer.fit()
    last = metrics(tmp_path / "run")[-1]
    assert 0.5 < last["wait_fraction"] <= 1.0  # 50 ms per batch against a step of a few ms
    assert last["tokens_per_s_run"] == pytest.approx(12 * 64 / (12 * 0.05), rel=0.5)
    postfix = trainer.postfix(trainer.train_step(next(iter(SyntheticActivations())) * trainer.scale))
    assert set(postfix) >= {"tok/s", "wait", "loss", "L0", "EV"} and postfix["wait"].endswith("%")


def test_a_damaged_newest_checkpoint_names_the_intact_one_to_resume_from(tmp_path):
    run = tmp_path / "run"
    Trainer(small_config(run, steps=20), SyntheticActivations(), progress=False).fit()  # steps 10 and 20 kept
    newest = ckpt.find_checkpoint(run)
    older = run / "checkpoints" / "step_000000010"
    data = (newest / ckpt.STATE_TENSORS_FILE).read_bytes()
    (newest / ckpt.STATE_TENSORS_FILE).write_bytes(data[: len(data) // 2])  # damaged after it was written
    cfg = small_config(run, steps=30)
    with pytest.raises(ckpt.CheckpointError, match=f"newest intact one is {older}.*--resume {older}"):
        Trainer(cfg, SyntheticActivations(), progress=False, resume=run)
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):  # named explicitly: no other suggestion
        Trainer(cfg, SyntheticActivations(), progress=False, resume=newest)
    resumed = Trainer(cfg, SyntheticActivations(), progress=False, resume=older)  # the suggested command works
    assert resumed.step == 10
    resumed.fit()


def test_a_full_disk_while_saving_keeps_latest_and_says_so(tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(small_config(run, steps=20), SyntheticActivations(), progress=False)
    for _ in range(10):
        trainer.fit_step()  # saves step 10
    before = ckpt.find_checkpoint(run)

    def full(path, tensors):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_save_tensors", full)
    for _ in range(9):
        trainer.fit_step()
    with pytest.raises(ckpt.CheckpointWriteError, match=f"still the latest checkpoint.*--resume {run}"):
        trainer.fit_step()  # step 20 is due
    monkeypatch.undo()
    assert ckpt.find_checkpoint(run) == before
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the half-written folder is gone
    ckpt.load_training_state(before)
