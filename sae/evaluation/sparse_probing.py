"""k-sparse probing: how well k of an SAE's latents, chosen without looking at the test set, predict a label.

For labelled text, the latents are ranked on the training split by the mean difference of their activations
between classes: for two classes |mean(class 1) - mean(class 0)|; for more, one-vs-rest, each latent scored by
its largest |mean(class c) - mean(the rest)| over the classes. A probe (sae/evaluation/probes.py) is fitted on
the top k latents for each k, and compared with a probe on the dense activations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sae.errors import ConfigError
from sae.evaluation.probes import accuracy, fit_probe, predict

DEFAULT_KS = (1, 2, 5, 10, 20, 50)


def mean_difference_scores(latents: Tensor, y: Tensor) -> Tensor:
    """[F] score of each latent: |mean difference| between the two classes, or the largest one-vs-rest one."""
    latents = latents.to(torch.float64)
    classes = torch.unique(y)
    if len(classes) < 2:
        raise ConfigError("ranking latents by mean difference needs at least two classes in the training labels")
    if len(classes) == 2:
        return (latents[y == classes[1]].mean(0) - latents[y == classes[0]].mean(0)).abs()
    scores = [(latents[y == c].mean(0) - latents[y != c].mean(0)).abs() for c in classes]
    return torch.stack(scores).amax(0)


def top_latents(latents: Tensor, y: Tensor, k: int) -> Tensor:
    """The k latents [k] with the largest mean-difference scores (ties: the lower index first)."""
    d_sae = latents.shape[1]
    if k > d_sae:
        raise ConfigError(f"asked for the top {k} latents but the SAE has only {d_sae}; ask for at most {d_sae}")
    scores = mean_difference_scores(latents, y)
    order = torch.sort(-scores, stable=True).indices
    return order[:k]


def k_sparse_probing(
    train_latents: Tensor,
    y_train: Tensor,
    test_latents: Tensor,
    y_test: Tensor,
    ks: Sequence[int] | None = None,
    dense: tuple[Tensor, Tensor] | None = None,
) -> dict:
    """Test accuracy of a probe on the top-k latents for each k (default DEFAULT_KS up to d_sae; an explicit k
    above d_sae is refused), and of a probe on dense (train, test) activations when given."""
    d_sae = train_latents.shape[1]
    if ks is None:
        ks = [k for k in DEFAULT_KS if k <= d_sae]
    out: dict = {"k": {}, "latents": {}, "d_sae": d_sae}
    for k in ks:
        chosen = top_latents(train_latents, y_train, k)
        probe = fit_probe(train_latents[:, chosen], y_train)
        out["k"][k] = accuracy(predict(probe, test_latents[:, chosen]), y_test)
        out["latents"][k] = chosen.tolist()
    if dense is not None:
        probe = fit_probe(dense[0], y_train)
        out["dense"] = accuracy(predict(probe, dense[1]), y_test)
    return out
