"""Training objectives: a reconstruction term (mean, or tilted with TERM) plus one of the two JumpReLU
sparsity terms (RECIPES sections 1 and 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

SparsityKind = Literal["l0", "target_l0"]
SPARSITY_KINDS: tuple[str, ...] = get_args(SparsityKind)


class Loss(NamedTuple):
    total: Tensor  # scalar, what is differentiated
    reconstruction: Tensor  # scalar, the reconstruction term as optimised (tilted when tilt != 0)
    mse: Tensor  # scalar, ||x - x_hat||^2 summed over D, plain mean over B (comparable across tilts)
    sparsity: Tensor  # scalar, coefficient already applied


def per_token_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """||x - x_hat||^2 summed over d_in: [B]."""
    return (x - x_hat).pow(2).sum(dim=-1)


def tilted_mean(losses: Tensor, tilt: float) -> Tensor:
    """TERM, the tilted empirical risk (1/t) log((1/N) sum_i exp(t * l_i)) of per-token losses [N].

    t = 0 is the ordinary mean; t -> inf approaches the max, up-weighting badly reconstructed tokens. Computed
    with logsumexp, so no exp overflows even at t = 1e9: it equals max(l) + (log sum exp(t (l - max)) - log N)/t.
    Its gradient w.r.t. l_i is softmax(t * l)_i, the tilted weights.
    """
    if tilt == 0:
        return losses.mean()
    return (torch.logsumexp(losses * tilt, dim=0) - math.log(losses.numel())) / tilt


def sparsity_loss(l0: Tensor, kind: SparsityKind, coefficient: float, target_l0: float) -> Tensor:
    """The sparsity term from the per-row L0 [B] (which carries the threshold STE gradient).

    "l0" (Gemma Scope): coefficient * mean_b L0.
    "target_l0" (Salmon): coefficient * (mean_b L0 / target - 1)^2.
    """
    mean_l0 = l0.mean()
    if kind == "l0":
        return coefficient * mean_l0
    if kind == "target_l0":
        return coefficient * (mean_l0 / target_l0 - 1.0) ** 2
    raise ValueError(f"unknown sparsity objective {kind!r}; use one of {SPARSITY_KINDS}")


@dataclass(frozen=True)
class Objective:
    """The training loss of one step as a function of per-token errors and per-row L0: the one definition
    both steps use. The dense step differentiates it with autograd through the SAE; the sparse step's kernels
    take only its gradients with respect to `errors` and `l0` (two [B] vectors) from it.

    sparsity, coefficient, target_l0: the sparsity term (coefficient already warmed up for this step).
    tilt: TERM tilt of the reconstruction term (0: the plain mean).
    """

    sparsity: SparsityKind
    coefficient: float
    target_l0: float
    tilt: float = 0.0

    def __call__(self, errors: Tensor, l0: Tensor) -> Loss:
        """errors: [B] ||x - x_hat||^2 summed over d_in; l0: [B] active latents per row."""
        mse = errors.mean()
        rec = mse if self.tilt == 0 else tilted_mean(errors, self.tilt)
        sp = sparsity_loss(l0, self.sparsity, self.coefficient, self.target_l0)
        return Loss(rec + sp, rec, mse.detach(), sp)


def sae_loss(
    x: Tensor, x_hat: Tensor, l0: Tensor, kind: SparsityKind, coefficient: float, target_l0: float, tilt: float = 0.0
) -> Loss:
    return Objective(kind, coefficient, target_l0, tilt)(per_token_error(x, x_hat), l0)
