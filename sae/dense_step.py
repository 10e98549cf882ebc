"""The dense training step: autograd through the SAE forward (either backend), torch Adam over every parameter.

forward -> Objective -> backward -> decoder-gradient projection -> clipping -> Adam -> renormalisation and the
threshold floor (RECIPES section 1). Every [F, D] gradient and both Adam moments exist in full; the sparse
step (sae/sparse_step.py) computes the same update touching only the latents with a non-zero gradient.

With a `Mesh` the step is latent-sharded (sae/distributed/sharded.py): `model` holds this rank's slice of the
latents, the forward sums the ranks' partial reconstructions and L0s, and the gradient norm is reduced over the
ranks; everything after it (projection, clipping, Adam, renormalisation, threshold floor) is local.
Without one (None) it is the single-process step, computing exactly as before sharding existed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from kernels.reference import Forward
from sae.config import OptimConfig
from sae.distributed import sharded
from sae.distributed.mesh import Mesh
from sae.health import check_step_values
from sae.model import PARAM_NAMES, THRESHOLD_FLOOR, JumpReLUSAE
from sae.objectives import Loss, Objective, per_token_error
from sae.steps import DENSE_PREFIX, StepResult, explained_variance, saved_optimizer_state


class DenseUpdate(NamedTuple):
    """What `dense_update` computed, as tensors (no host synchronisation)."""

    loss: Loss
    forward: Forward  # x_hat, per-row l0, active indices and values
    explained_variance: Tensor  # []
    grad_norm: Tensor  # [] before clipping
    communicated_bytes: int  # payload bytes this rank's collectives moved during the step (0 without a mesh)


def dense_update(
    model: JumpReLUSAE,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    lr: float,
    objective: Objective,
    max_grad_norm: float,
    *,
    autocast: torch.dtype | None = None,
    guard: Callable[[Mapping[str, Tensor]], None] | None = check_step_values,
    mesh: Mesh | None = None,
) -> DenseUpdate:
    """The dense step's mathematics, written once (the trainer's `DenseStep`, the bench and the tests run it).

    autocast: run the forward and the loss under torch.autocast(x's device type, dtype=autocast), the usual
    mixed-precision recipe (backward and optimizer outside it). guard: called with the loss and the gradient
    norm before any parameter moves (default: raise `NonFiniteStep` when one is not finite; None: no check and
    no host synchronisation, e.g. inside torch.compile). mesh: `model` is this rank's latent slice and every
    rank calls this with the same x (module docstring); the loss, L0, gradient norm and b_dec stay identical on
    every rank, so `guard` raises on all of them alike. None: one process, the whole SAE.
    """
    sent = 0 if mesh is None else mesh.sent_total()
    for group in optimizer.param_groups:
        group["lr"] = lr
    amp = contextlib.nullcontext() if autocast is None else torch.autocast(x.device.type, dtype=autocast)
    with amp:
        out = model(x) if mesh is None else sharded.sharded_forward(model, x, mesh)
        loss = objective(per_token_error(x, out.x_hat), out.l0)
    optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    model.project_decoder_grad()
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    if mesh is None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    else:
        grad_norm = sharded.clip_grad_norm_(model, max_norm, mesh)
    if guard is not None:
        guard({"loss": loss.total, "gradient norm": grad_norm})
    apply_update(model, optimizer)
    with torch.no_grad():
        ev = explained_variance(x, out.x_hat)
    communicated = 0 if mesh is None else mesh.sent_total() - sent
    return DenseUpdate(loss, out, ev, grad_norm, communicated)


def apply_update(model: JumpReLUSAE, optimizer: torch.optim.Optimizer) -> None:
    """The end of the dense step, from the clipped gradients in `.grad`: Adam, renormalisation, threshold floor."""
    optimizer.step()
    with torch.no_grad():
        model.normalize_decoder()
        model.threshold.clamp_(min=THRESHOLD_FLOOR)


class DenseStep:
    """`sae.steps.TrainStep` with torch.optim.Adam(betas=(beta1, beta2)) over the SAE's parameters.

    Raises `sae.health.NonFiniteStep` before the update when the loss or the gradient norm is not finite.
    mesh: `model` is this rank's latent slice (`sae.distributed.sharded.shard_sae`) and the step is sharded
    (`dense_update`); the optimizer state is then this rank's slice too, and the result's indices are local
    latent ids (add the rank's `LatentSlice.start` for global ones). None: one process.
    """

    def __init__(self, model: JumpReLUSAE, optim: OptimConfig, mesh: Mesh | None = None):
        self.model, self.mesh = model, mesh
        self.max_grad_norm = optim.max_grad_norm
        self.optimizer = torch.optim.Adam(
            [getattr(model, name) for name in PARAM_NAMES], lr=optim.lr,
            betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps,
        )  # fmt: skip

    def __call__(self, x: Tensor, lr: float, objective: Objective) -> StepResult:
        u = dense_update(self.model, self.optimizer, x, lr, objective, self.max_grad_norm, mesh=self.mesh)
        loss, out = u.loss, u.forward
        return StepResult(
            loss.total.item(), loss.reconstruction.item(), loss.mse.item(), loss.sparsity.item(), out.l0.mean().item(),
            u.explained_variance.item(), u.grad_norm.item(), 0.0, out.indices, out.values, u.communicated_bytes,
        )  # fmt: skip

    def state_dict(self) -> dict[str, Tensor]:
        model = self.model
        return {
            f"{DENSE_PREFIX}{name}.{key}": value
            for name in PARAM_NAMES
            for key, value in self.optimizer.state.get(getattr(model, name), {}).items()
        }

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """torch Adam state from "optim." tensors, or converted exactly from the sparse step's "lazy_adam." ones."""
        by_name, lazy = saved_optimizer_state(tensors)
        if lazy:
            from sae.sparse_step import adam_state_from_lazy

            by_name = adam_state_from_lazy(lazy)
        device = self.model.b_dec.device
        state = {  # the optimizer holds the parameters in PARAM_NAMES order
            i: {k: v if k == "step" else v.to(device) for k, v in by_name[name].items()}
            for i, name in enumerate(PARAM_NAMES) if name in by_name
        }  # fmt: skip
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})
