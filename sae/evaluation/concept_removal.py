"""Concept removal (the Specialized SAEs paper's use of SAE latents): a probe for a target label is trained on
activations where a spurious attribute goes with the label; the latents most tied to the attribute are ablated;
does the probe stop leaning on the attribute?

- The probe: sae/evaluation/probes.py, fitted on the training split's activations (attribute correlated with the
  label), and fitted again on the training split after each ablation (a fixed probe would also see the constant
  shift that removing a latent's mean contribution makes, and say little about the concept).
- The latents: the n with the largest |attribute mean difference within each label class, averaged over the
  classes| on the training split, a simple criterion stated in the report. Within a class the label is fixed, so a
  latent that tracks only the label scores about 0 even though the attribute goes with the label overall.
- The ablation: x' = x - f_S W_dec[S], the decoder's contribution of the latents S removed; since the SAE's
  error term x - x_hat is kept, only those latents change: x' = x_hat(f with S zeroed) + (x - x_hat).
- The measure: the probe's overall and worst-group accuracy (groups: label x attribute) on the test split,
  where the attribute is independent of the label, before and after the ablation, and after ablating n random
  latents instead (the mean over a few seeded draws).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from sae.errors import ConfigError
from sae.evaluation.probes import accuracy, fit_probe, predict, worst_group_accuracy


class LabelledActivations(NamedTuple):
    """One split: activations [N, D], the SAE's latent activations of them [N, F], the target labels [N] (0/1)
    and the spurious attribute [N] (0/1). For texts, x and latents are both means over a text's tokens: the
    decoder is linear, so removing the pooled latents' contribution from the pooled x is the pooled ablation."""

    x: Tensor
    latents: Tensor
    labels: Tensor
    spurious: Tensor


def ablate(x: Tensor, acts: Tensor, W_dec: Tensor, latents: Tensor) -> Tensor:
    """x [N, D] with the decoder contribution of `latents` (their activations acts [N, F]) removed."""
    return x - acts[:, latents] @ W_dec[latents]


def attribute_scores(latents: Tensor, labels: Tensor, spurious: Tensor) -> Tensor:
    """[F] |mean over label classes of (mean activation, attribute 1 - attribute 0, within the class)|; classes
    missing one attribute value are left out."""
    diffs = []
    for c in torch.unique(labels):
        one, zero = (labels == c) & (spurious == 1), (labels == c) & (spurious == 0)
        if one.any() and zero.any():
            diffs.append(latents[one].double().mean(0) - latents[zero].double().mean(0))
    if not diffs:
        raise ConfigError("no label class of the training split holds both values of the spurious attribute")
    return torch.stack(diffs).mean(0).abs()


def concept_removal(
    W_dec: Tensor,
    train: LabelledActivations,
    test: LabelledActivations,
    n_latents: int = 1,
    random_draws: int = 5,
    seed: int = 0,
) -> dict:
    """The report's figures for one SAE (decoder W_dec [F, D]) on a task's train and test splits."""
    (x_tr, acts_tr, y_tr, s_tr), (x_te, acts_te, y_te, s_te) = train, test
    d_sae = W_dec.shape[0]
    if not 0 < n_latents <= d_sae:
        raise ConfigError(f"asked to ablate {n_latents} latents but the SAE has {d_sae}; use 1 to {d_sae}")
    for name, t in (("target labels", y_tr), ("spurious attribute", s_tr)):
        if len(torch.unique(t)) != 2:
            raise ConfigError(f"concept removal needs two values of the {name} in the training split")
    groups = 2 * y_te.long() + s_te.long()
    spurious = torch.sort(-attribute_scores(acts_tr, y_tr, s_tr), stable=True).indices[:n_latents]

    def measure(latents: Tensor | None) -> dict[str, float]:
        """Fit the probe on the (ablated) training split, score it on the (ablated) test split."""
        train_x = x_tr if latents is None else ablate(x_tr, acts_tr, W_dec, latents)
        test_x = x_te if latents is None else ablate(x_te, acts_te, W_dec, latents)
        predicted = predict(fit_probe(train_x, y_tr), test_x)
        return {"accuracy": accuracy(predicted, y_te), "worst_group": worst_group_accuracy(predicted, y_te, groups)}

    generator = torch.Generator().manual_seed(seed)
    draws = [measure(torch.randperm(d_sae, generator=generator)[:n_latents]) for _ in range(random_draws)]
    return {
        "criterion": "largest |attribute 1 - attribute 0 mean latent activation within each label class, averaged| "
        "on the training split",
        "n_latents": n_latents,
        "ablated": spurious.tolist(),
        "before": measure(None),
        "after": measure(spurious),
        "random": {key: sum(d[key] for d in draws) / len(draws) for key in ("accuracy", "worst_group")},
        "random_draws": random_draws,
    }
