"""One training step behind one small interface, and the one place that picks its implementation.

A step takes a batch, the learning rate and this step's `Objective` (its sparsity coefficient already warmed
up), updates the SAE and its optimizer in place, and returns what the trainer logs. Two implementations of the
same mathematics (RECIPES section 1; tests/test_sparse_step.py compares them):

    DenseStep   (sae/dense_step.py)   autograd through the SAE forward, torch Adam over every parameter
    SparseStep  (sae/sparse_step.py)  the Triton kernels' compact gradients, LazyAdam over the touched latents

`sae.trainer.make_step` picks one, once. A step's optimizer state is saved in the checkpoint's
training_state.safetensors under its own prefix ("optim." dense, "lazy_adam." sparse), and each step loads
either format, so a run may change backend on resume.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from torch import Tensor

from sae.objectives import Objective


class StepResult(NamedTuple):
    """One step's figures (host floats, as logged) and the batch's active latents (for dead-latent tracking)."""

    loss: float
    reconstruction: float  # as optimised: tilted when the objective's tilt > 0
    mse: float  # plain mean over B of ||x - x_hat||^2, comparable across tilts
    sparsity: float  # coefficient applied
    l0: float  # mean over the batch
    explained_variance: float  # about the batch mean (RECIPES 3)
    grad_norm: float  # of all parameters' gradients, before clipping
    encode_reruns: float  # 1 when a row overflowed the fused encode's capacity and it ran again (sparse only)
    indices: Tensor  # [B, K] int64 active latents per row (a sharded step: this rank's local latent ids)
    values: Tensor  # [B, K] their values; > 0 marks a used slot
    communicated_bytes: int = 0  # payload bytes sent by this rank's collectives (sharded step; 0 in one process)


class TrainStep(Protocol):
    """What the trainer needs of a step: run it, and save / restore its optimizer state."""

    def __call__(self, x: Tensor, lr: float, objective: Objective) -> StepResult:
        """Update the SAE on x [B, D] (already scaled) at learning rate lr."""
        ...

    def state_dict(self) -> dict[str, Tensor]:
        """The optimizer state as checkpoint tensors (flat names with the step's prefix)."""
        ...

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Restore from checkpoint tensors written by either step (other keys are ignored)."""
        ...


DENSE_PREFIX = "optim."  # checkpoint keys of torch Adam's state: optim.<param>.<moment>
SPARSE_PREFIX = "lazy_adam."  # checkpoint keys of LazyAdam's state: lazy_adam.<key>


def saved_optimizer_state(tensors: dict[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """(torch Adam state {param: {moment: tensor}}, LazyAdam state {key: tensor}) found among checkpoint
    tensors; one of them is empty (both before the first step)."""
    adam: dict[str, dict[str, Tensor]] = {}
    lazy: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if key.startswith(DENSE_PREFIX):
            name, moment = key[len(DENSE_PREFIX) :].split(".", 1)
            adam.setdefault(name, {})[moment] = value
        elif key.startswith(SPARSE_PREFIX):
            lazy[key[len(SPARSE_PREFIX) :]] = value
    return adam, lazy


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 over the batch (variance about the mean, RECIPES 3)."""
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return 1.0 - residual / total
