"""TERM, the tilted reconstruction objective (RECIPES section 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sae.objectives import sae_loss, tilted_mean


def losses_strategy():
    return st.lists(st.floats(0.0, 50.0, allow_nan=False), min_size=1, max_size=40).map(
        lambda v: torch.tensor(v, dtype=torch.float64)
    )


@settings(max_examples=100, deadline=None)
@given(losses_strategy())
def test_small_tilt_is_the_mean(losses):
    # (1/t) log mean exp(t l) = mean(l) + t var(l) / 2 + O(t^2): at t = 1e-9 the gap is below 1e-6.
    assert tilted_mean(losses, 1e-9).item() == pytest.approx(losses.mean().item(), abs=1e-6)
    assert tilted_mean(losses, 0.0).item() == losses.mean().item()


@settings(max_examples=100, deadline=None)
@given(losses_strategy(), st.sampled_from([1e3, 1e6, 1e9]))
def test_large_tilt_approaches_the_max(losses, tilt):
    # Between max - log(N)/t and max: the whole set lies within log(N)/t of its maximum.
    value = tilted_mean(losses, tilt).item()
    top = losses.max().item()
    assert top - math.log(len(losses)) / tilt - 1e-9 <= value <= top + 1e-9


@settings(max_examples=100, deadline=None)
@given(losses_strategy(), st.sampled_from([0.01, 0.3, 2.0, 50.0]))
def test_gradient_is_the_softmax_weighted_per_token_gradient(losses, tilt):
    leaf = losses.clone().requires_grad_()
    tilted_mean(leaf, tilt).backward()
    t = losses.numpy() * tilt
    weights = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
    np.testing.assert_allclose(leaf.grad.numpy(), weights, rtol=1e-10, atol=1e-14)


def test_huge_tilt_neither_overflows_nor_loses_the_gradient():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    x_hat = (x + 0.1 * torch.randn(64, 16, generator=torch.Generator().manual_seed(1))).requires_grad_()
    loss = sae_loss(x, x_hat, torch.full((64,), 5.0), "target_l0", 1.0, 5.0, tilt=1e9)
    errors = (x - x_hat).pow(2).sum(-1)
    assert torch.isfinite(loss.total)
    assert loss.reconstruction.item() == pytest.approx(errors.max().item(), rel=1e-6)
    loss.total.backward()
    assert torch.isfinite(x_hat.grad).all()
    worst = int(errors.argmax())
    # All the weight sits on the worst token: only its row gets a gradient, d/dx_hat = -2 (x - x_hat).
    torch.testing.assert_close(x_hat.grad[worst], -2 * (x[worst] - x_hat[worst]).detach())
    assert x_hat.grad[torch.arange(64) != worst].abs().max() == 0


def test_mse_is_reported_untilted():
    x, x_hat = torch.zeros(4, 2), torch.tensor([[1.0, 0], [0, 0], [0, 0], [0, 3.0]])
    loss = sae_loss(x, x_hat, torch.ones(4), "l0", 0.0, 1.0, tilt=5.0)
    assert loss.mse.item() == pytest.approx(10 / 4)
    assert loss.reconstruction.item() == pytest.approx(math.log((math.exp(5) + 2 + math.exp(45)) / 4) / 5)
