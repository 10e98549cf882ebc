"""Reconstruction and sparsity metrics of an SAE over a held-out token set, as streaming accumulators.

Shapes: B tokens per chunk, D d_in, F d_sae, K active slots per row; N tokens over the whole set.

Feed chunks with `update` and read `result()` at the end: nothing but O(D + F) float64/int64 state is kept,
so the set can be any size. The caller chooses the tokens (e.g. the harvester's keep mask, special tokens
excluded, RECIPES 3).

Variance about the mean (RECIPES 3) is pooled over the set:

    FVU = sum_b ||x_b - x_hat_b||^2 / sum_b ||x_b - mean(x)||^2,     mean(x) [D] over all N tokens

The denominator is accumulated per dimension with Chan et al.'s pairwise merge of (count, mean, M2),
M2 = sum (x - mean)^2, each chunk's M2 taken about the chunk's own mean, all in float64:

    n = n_a + n_b;   delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n;   M2 = M2_a + M2_b + delta^2 * n_a * n_b / n

Unlike sum x^2 - n mean^2 this never subtracts two large numbers: on residual streams with a large constant
offset (RECIPES 7: one dimension's mean is ~10^4 while the others are O(1-100)) the textbook formula loses
about log10(mean^2 / var) of float64's 16 digits, Chan's merge none. The about-zero variant
(sum ||x - x_hat||^2 / sum ||x||^2, what one library reported until 2026) comes from the same state,
sum x^2 = M2 + n * mean^2 (two non-negative terms, no cancellation).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class Moments:
    """Streaming per-column count, mean and M2 = sum (y - mean)^2 of [B, P] chunks, float64, Chan's merge."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None  # [P] float64
        self.m2: Tensor | None = None  # [P] float64

    def update(self, y: Tensor) -> None:
        """Merge a chunk y [B, P] (any float dtype; computed in float64)."""
        n_b = y.shape[0]
        if n_b == 0:
            return
        y = y.double()
        mean_b = y.mean(dim=0)
        m2_b = (y - mean_b).pow(2).sum(dim=0)
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.pow(2) * (self.n * n_b / n)
        self.n = n

    def sum_squares(self) -> Tensor:
        """sum y^2 per column [P] (about zero), as M2 + n * mean^2."""
        return self.m2 + self.n * self.mean.pow(2)


def check_pair(x: Tensor, x_hat: Tensor) -> None:
    """Raise ValueError unless x and x_hat are token matrices [B, D] of one shape."""
    if x.dim() != 2 or x_hat.shape != x.shape:
        raise ValueError(
            f"x and x_hat must both be [B, D] of one shape; got {tuple(x.shape)} and {tuple(x_hat.shape)}. "
            "Select the evaluated positions (e.g. acts[keep]) before updating."
        )


class Reconstruction(NamedTuple):
    """Pooled reconstruction quality over N tokens (see the module docstring for the formulas)."""

    tokens: int  # N
    fvu: float  # sum ||x - x_hat||^2 / sum ||x - mean(x)||^2: variance about the mean (RECIPES 3)
    explained_variance: float  # 1 - fvu
    fvu_about_zero: float  # sum ||x - x_hat||^2 / sum ||x||^2: the old convention, only to compare old numbers
    explained_variance_about_zero: float  # 1 - fvu_about_zero
    mse: float  # mean over tokens of ||x - x_hat||^2 (summed over D)
    variance: float  # mean over tokens of ||x - mean(x)||^2, the FVU's denominator per token


class ReconstructionAccumulator:
    """Streams (x, x_hat) chunks [B, D] into the pooled FVU; O(D) float64 state."""

    def __init__(self) -> None:
        self.moments = Moments()
        self.squared_error = 0.0  # sum ||x - x_hat||^2, float64

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        check_pair(x, x_hat)
        if self.moments.mean is not None and x.shape[1] != self.moments.mean.shape[0]:
            raise ValueError(f"x has d_in={x.shape[1]} but earlier chunks had {self.moments.mean.shape[0]}")
        self.moments.update(x)
        self.squared_error += float((x.double() - x_hat.double()).pow(2).sum())

    def result(self) -> Reconstruction:
        n = self.moments.n
        if n == 0:
            raise ValueError("no tokens were evaluated: update() the accumulator with at least one token first")
        total = float(self.moments.m2.sum())
        about_zero = float(self.moments.sum_squares().sum())
        fvu = self.squared_error / total if total > 0 else math.nan
        fvu_zero = self.squared_error / about_zero if about_zero > 0 else math.nan
        return Reconstruction(
            tokens=n,
            fvu=fvu,
            explained_variance=1.0 - fvu,
            fvu_about_zero=fvu_zero,
            explained_variance_about_zero=1.0 - fvu_zero,
            mse=self.squared_error / n,
            variance=total / n,
        )


class FrequencyHistogram(NamedTuple):
    """Histogram of log10 firing frequency over the latents that fired at least once."""

    edges: Tensor  # [bins + 1] float64, log10 frequency, from log10(1 / N) to 0 (the last bin includes 0)
    counts: Tensor  # [bins] int64, latents per bin
    dead: int  # latents that never fired (log10 frequency -inf), not in any bin


class Sparsity(NamedTuple):
    """Firing statistics of F latents over N tokens."""

    tokens: int  # N: the window the dead fraction refers to (the convention is 10M; report it)
    mean_l0: float  # mean number of active latents per token
    dead_fraction: float  # latents that did not fire on any of the N tokens
    dense_fraction: float  # latents that fired on more than dense_threshold * N tokens
    dense_threshold: float  # the firing-frequency threshold of dense_fraction
    fire_counts: Tensor  # [F] int64, tokens on which each latent fired
    log10_frequency: Tensor  # [F] float64, log10(fire_counts / N); -inf for dead latents

    def histogram(self, bins: int = 50) -> FrequencyHistogram:
        """The density histogram (RECIPES 3): `bins` equal bins of log10 frequency over [log10(1/N), 0]."""
        if bins < 1:
            raise ValueError(f"bins={bins} must be at least 1")
        low = math.log10(1.0 / self.tokens) if self.tokens > 1 else -1.0  # rarest possible: once in N tokens
        edges = torch.linspace(low, 0.0, bins + 1, dtype=torch.float64)
        freq = self.log10_frequency.cpu()
        # Clamp: log10 rounding must not push frequency 1/N or 1 out of the closed range.
        live = freq[torch.isfinite(freq)].clamp(low, 0.0)
        counts = torch.histogram(live, bins=edges).hist.to(torch.int64)
        return FrequencyHistogram(edges=edges, counts=counts, dead=int(freq.numel() - live.numel()))


class FiringAccumulator:
    """Streams which latents fired on each token into per-latent fire counts [F] int64.

    Active means a non-zero activation: JumpReLU activations are > theta > 0 when active and exactly 0
    otherwise, and the compact form of `kernels.reference.Forward` pads with value 0.
    """

    def __init__(self, d_sae: int, device: str | torch.device = "cpu") -> None:
        if d_sae < 1:
            raise ValueError(f"d_sae={d_sae} must be at least 1")
        self.d_sae = d_sae
        self.fire_counts = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.tokens = 0

    def update(self, indices: Tensor, values: Tensor) -> None:
        """Add B tokens given as their compact active set: indices, values [B, K] (`Forward.indices/values`).

        Row b's active latents are indices[b, k] where values[b, k] != 0; a latent appears at most once
        per row (true of `active_set`).
        """
        if indices.dim() != 2 or values.shape != indices.shape:
            raise ValueError(
                f"indices and values must both be [B, K]; got {tuple(indices.shape)} and {tuple(values.shape)}"
            )
        active = indices[values != 0].to(self.fire_counts.device)
        if active.numel() and (active.min() < 0 or active.max() >= self.d_sae):
            raise ValueError(
                f"latent indices must lie in [0, {self.d_sae}); got {int(active.min())}..{int(active.max())}"
            )
        self.fire_counts += torch.bincount(active, minlength=self.d_sae)
        self.tokens += indices.shape[0]

    def update_dense(self, acts: Tensor) -> None:
        """Add B tokens given as dense activations acts [B, F]."""
        if acts.dim() != 2 or acts.shape[1] != self.d_sae:
            raise ValueError(f"acts must be [B, F={self.d_sae}]; got {tuple(acts.shape)}")
        self.fire_counts += (acts != 0).sum(dim=0).to(self.fire_counts.device)
        self.tokens += acts.shape[0]

    def result(self, dense_threshold: float = 0.1) -> Sparsity:
        """Statistics so far; a latent is dense when it fired on more than dense_threshold of the tokens."""
        if self.tokens == 0:
            raise ValueError("no tokens were evaluated: update() the accumulator with at least one token first")
        if not 0.0 <= dense_threshold <= 1.0:
            raise ValueError(f"dense_threshold={dense_threshold} is a fraction of tokens: pass a value in [0, 1]")
        counts = self.fire_counts.cpu()
        frequency = counts.double() / self.tokens
        return Sparsity(
            tokens=self.tokens,
            mean_l0=float(counts.sum()) / self.tokens,  # total active (token, latent) pairs per token
            dead_fraction=float((counts == 0).double().mean()),
            dense_fraction=float((frequency > dense_threshold).double().mean()),
            dense_threshold=dense_threshold,
            fire_counts=counts,
            log10_frequency=torch.log10(frequency),
        )
