"""Linear probes: multinomial logistic regression on standardised features, fitted full-batch with L-BFGS in
float64 (deterministic: no sampling, a fixed start), and the accuracies the interpretability evaluations report.

Used by k-sparse probing (sae/evaluation/sparse_probing.py) and concept removal (concept_removal.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from sae.errors import ConfigError


class Probe(NamedTuple):
    weight: Tensor  # [d, C] on standardised features
    bias: Tensor  # [C]
    mean: Tensor  # [d] feature means of the training set
    scale: Tensor  # [d] feature standard deviations (1 where a feature is constant)


def fit_probe(x: Tensor, y: Tensor, l2: float = 1e-3, max_iter: int = 200) -> Probe:
    """Logistic regression of the labels y [N] (0..C-1) on x [N, d]: mean cross-entropy + l2 * ||W||^2 / 2."""
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ConfigError(f"a probe needs features [N, d] and labels [N]; got {tuple(x.shape)} and {tuple(y.shape)}")
    classes = int(y.max()) + 1 if y.numel() else 0
    if classes < 2 or len(torch.unique(y)) < 2:
        raise ConfigError(f"a probe needs at least two classes among its {y.numel()} training labels")
    x = x.detach().to(torch.float64)
    mean, scale = x.mean(0), x.std(0, unbiased=False)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    z = (x - mean) / scale
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")
    target = y.long()

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, target) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return Probe(weight.detach(), bias.detach(), mean, scale)


def predict(probe: Probe, x: Tensor) -> Tensor:
    """The most likely class [N] of each row of x [N, d]."""
    z = (x.detach().to(torch.float64) - probe.mean) / probe.scale
    return (z @ probe.weight + probe.bias).argmax(-1)


def accuracy(predicted: Tensor, y: Tensor) -> float:
    return float((predicted == y).double().mean())


def group_accuracies(predicted: Tensor, y: Tensor, groups: Tensor) -> dict[int, float]:
    """Accuracy within each group (e.g. label x spurious attribute), keyed by the group's id."""
    return {int(g): accuracy(predicted[groups == g], y[groups == g]) for g in torch.unique(groups)}


def worst_group_accuracy(predicted: Tensor, y: Tensor, groups: Tensor) -> float:
    return min(group_accuracies(predicted, y, groups).values())
