"""Training objectives: reconstruction error plus one of the two JumpReLU sparsity terms (RECIPES 1)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Loss(NamedTuple):
    total: Tensor  # scalar, what is differentiated
    reconstruction: Tensor  # scalar, ||x - x_hat||^2 summed over D, mean over B
    sparsity: Tensor  # scalar, coefficient already applied


def reconstruction_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """||x - x_hat||^2 summed over d_in, averaged over the batch."""
    return (x - x_hat).pow(2).sum(dim=-1).mean()


def sparsity_loss(l0: Tensor, kind: str, coefficient: float, target_l0: float) -> Tensor:
    """The sparsity term from the per-row L0 [B] (which carries the threshold STE gradient).

    "l0" (Gemma Scope): coefficient * mean_b L0.
    "target_l0" (Salmon): coefficient * (mean_b L0 / target - 1)^2.
    """
    mean_l0 = l0.mean()
    if kind == "l0":
        return coefficient * mean_l0
    if kind == "target_l0":
        return coefficient * (mean_l0 / target_l0 - 1.0) ** 2
    raise ValueError(f"unknown sparsity objective {kind!r}; use 'l0' or 'target_l0'")


def sae_loss(x: Tensor, x_hat: Tensor, l0: Tensor, kind: str, coefficient: float, target_l0: float) -> Loss:
    rec = reconstruction_loss(x, x_hat)
    sp = sparsity_loss(l0, kind, coefficient, target_l0)
    return Loss(rec + sp, rec, sp)
