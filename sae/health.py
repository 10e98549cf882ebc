"""A run that goes wrong says so: non-finite values stop it (or skip the batch), an exploding loss warns.

The steps refuse to apply an update whose loss or gradient norm is not finite (`NonFiniteStep`, raised before
any parameter is written), so the SAE in memory is still the last good one; the trainer then stops with
`TrainingHealthError` (the default) or, with --on-nonfinite skip, drops the batch, up to
--max-skipped-batches times. Checkpoints are checked before they are written (`check_finite_parameters`), so
none ever holds a non-finite value and `latest` keeps pointing at the last good one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

LIKELY_CAUSES = (
    "likely causes: a learning rate too high for this SAE (lower --lr, or lengthen --lr-warmup-steps), "
    "activations far from the scale training assumes (keep --scale-activations on; check the model's "
    "activations with --norm-outlier-factor), or a precision too low for these values (--compute-dtype float32, "
    "--model-dtype float32)"
)


class NonFiniteStep(ArithmeticError):
    """A step found a non-finite loss or gradient norm and applied nothing."""

    def __init__(self, quantity: str, value: float):
        super().__init__(f"{quantity} is {value}")
        self.quantity, self.value = quantity, value


class TrainingHealthError(RuntimeError):
    """The run stopped because a value went non-finite (the message says where, and what to change)."""


def check_step_values(values: Mapping[str, Tensor]) -> None:
    """Raise NonFiniteStep naming the first non-finite scalar of `values` ({name: 0-dim tensor}); one host
    synchronisation for them all."""
    finite = torch.stack([torch.isfinite(v.detach()).all() for v in values.values()]).tolist()
    for (name, value), ok in zip(values.items(), finite, strict=True):
        if not ok:
            raise NonFiniteStep(name, float(value.detach()))


def non_finite_parameters(params: Mapping[str, Tensor]) -> list[str]:
    """Names of the parameters holding any non-finite element (reads every element once)."""
    return [name for name, p in params.items() if not bool(torch.isfinite(p.detach()).all())]


def stop_message(step: int, quantity: str, value: float, last_checkpoint: str | None) -> str:
    where = (
        f"the last good checkpoint is {last_checkpoint}; continue from it with --resume after changing the "
        "setting at fault"
        if last_checkpoint
        else "no checkpoint was written yet"
    )
    return f"training stopped at step {step}: the {quantity} is {value} (not finite). {LIKELY_CAUSES}. {where}."


class LossWatch:
    """Warns when the loss stays far above its running level: `factor` times an exponential moving average
    (decay 0.99, updated only by unflagged steps) for `patience` consecutive steps; one warning per episode."""

    def __init__(self, factor: float = 10.0, patience: int = 20, decay: float = 0.99):
        self.factor, self.patience, self.decay = factor, patience, decay
        self.level: float | None = None
        self.streak = 0
        self.warned = False

    def update(self, step: int, loss: float) -> str | None:
        """Feed one step's loss; returns a warning text when an episode reaches `patience` steps."""
        if self.level is not None and loss > self.factor * self.level:
            self.streak += 1
            if self.streak >= self.patience and not self.warned:
                self.warned = True
                return (
                    f"warning: the loss has stayed above {self.factor:g}x its running level ({self.level:.4g}) "
                    f"for {self.streak} steps, now {loss:.4g} at step {step}: the run may be diverging "
                    "(a learning rate too high?)"
                )
            return None
        self.streak, self.warned = 0, False
        self.level = loss if self.level is None else self.decay * self.level + (1 - self.decay) * loss
        return None

    @property
    def exploding(self) -> bool:
        return self.warned
