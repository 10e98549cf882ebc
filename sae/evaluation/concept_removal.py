"""Concept removal (the Specialized SAEs paper's use of SAE latents): a probe for a target label is trained on
activations where a spurious attribute goes with the label; the latents most tied to the attribute are ablated;
does the probe stop leaning on the attribute?

- The probe: sae/evaluation/probes.py, fitted on the training split's activations (attribute correlated with the
  label). Two readings after an ablation: the same probe on the ablated test activations ("fixed"), and a probe
  fitted again on the ablated training split ("refitted": what a user would deploy once the concept is gone).
- The latents: the n with the largest |attribute mean difference within each label class, averaged over the
  classes| on the training split, a simple criterion stated in the report. Within a class the label is fixed, so a
  latent that tracks only the label scores about 0 even though the attribute goes with the label overall.
- The ablation: each chosen latent set to its training mean, x' = x - (f_S - mean_train f_S) W_dec[S]. Since
  the SAE's error term x - x_hat is kept, only those latents change. Setting them to their mean rather than zero
  keeps the fixed probe's inputs centred where it was fitted (zeroing would also shift every text by the
  latents' mean contribution); a refitted probe is the same either way (standardised features absorb the
  constant).
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


def ablate(x: Tensor, acts: Tensor, W_dec: Tensor, latents: Tensor, fill: Tensor) -> Tensor:
    """x [N, D] with `latents` (their activations acts [N, F]) set to `fill` [len(latents)] in the decoder's
    contribution."""
    return x - (acts[:, latents] - fill) @ W_dec[latents]


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

    probe = fit_probe(x_tr, y_tr)

    def score(predicted: Tensor) -> dict[str, float]:
        return {"accuracy": accuracy(predicted, y_te), "worst_group": worst_group_accuracy(predicted, y_te, groups)}

    def measure(latents: Tensor) -> tuple[dict[str, float], dict[str, float]]:
        """(fixed, refitted): the probe on the ablated test split, and one fitted again on the ablated training
        split and scored on the ablated test split."""
        fill = acts_tr[:, latents].double().mean(0).to(acts_tr.dtype)
        train_x, test_x = (ablate(x, a, W_dec, latents, fill) for x, a in ((x_tr, acts_tr), (x_te, acts_te)))
        return score(predict(probe, test_x)), score(predict(fit_probe(train_x, y_tr), test_x))

    generator = torch.Generator().manual_seed(seed)
    draws = [measure(torch.randperm(d_sae, generator=generator)[:n_latents]) for _ in range(random_draws)]
    mean = lambda ds: {key: sum(d[key] for d in ds) / len(ds) for key in ("accuracy", "worst_group")}  # noqa: E731
    fixed, refitted = measure(spurious)
    return {
        "criterion": "largest |attribute 1 - attribute 0 mean latent activation within each label class, averaged| "
        "on the training split",
        "n_latents": n_latents,
        "ablated": spurious.tolist(),
        "ablation": "each latent set to its training mean, the SAE's error term kept",
        "before": score(predict(probe, x_te)),
        "after": refitted,
        "after_fixed_probe": fixed,
        "random": mean([d[1] for d in draws]),
        "random_fixed_probe": mean([d[0] for d in draws]),
        "random_draws": random_draws,
    }
