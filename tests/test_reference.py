"""The PyTorch reference against the formulas of RECIPES.md section 1, computed independently in NumPy.

Everything runs in float64, where the window test (z - theta) / eps is the same IEEE computation on both
sides, so exact equality is expected for the masks and ~1e-12 for sums.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import reference as R


def rect(u: np.ndarray) -> np.ndarray:
    return ((u > -0.5) & (u < 0.5)).astype(np.float64)


@st.composite
def ste_case(draw):
    """z near theta (so a good share of pairs falls inside the window), an upstream gradient, eps."""
    b = draw(st.integers(1, 7))
    f = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    eps = draw(st.sampled_from([0.001, 0.05, 0.5, 2.0]))
    rng = np.random.default_rng(seed)
    theta = rng.uniform(0.01, 2.0, size=f)
    # Offsets of a few bandwidths around theta: some inside the window, some outside on each side.
    z = theta + rng.uniform(-2.0, 2.0, size=(b, f)) * eps
    far = rng.random((b, f)) < 0.3  # and some anywhere, mostly far outside the window
    z = np.where(far, rng.normal(scale=2.0, size=(b, f)), z)
    g = rng.normal(size=(b, f))
    return z, theta, g, eps


def grads(fn, z: np.ndarray, theta: np.ndarray, g: np.ndarray, eps: float):
    zt = torch.tensor(z, requires_grad=True)
    tt = torch.tensor(theta, requires_grad=True)
    out = fn(zt, tt, eps)
    out.backward(torch.tensor(g))
    return out.detach().numpy(), zt.grad.numpy(), tt.grad.numpy()


@settings(max_examples=200, deadline=None)
@given(ste_case())
def test_jumprelu_matches_pseudo_derivatives(case):
    z, theta, g, eps = case
    out, gz, gt = grads(R.jumprelu, z, theta, g, eps)
    fired = (z > theta).astype(np.float64)
    np.testing.assert_array_equal(out, z * fired)
    np.testing.assert_array_equal(gz, g * fired)  # d f / d z = H(z - theta)
    expected = (g * -(theta / eps) * rect((z - theta) / eps)).sum(axis=0)  # summed over the batch
    np.testing.assert_allclose(gt, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(ste_case())
def test_step_matches_pseudo_derivatives(case):
    z, theta, g, eps = case
    out, gz, gt = grads(R.step, z, theta, g, eps)
    np.testing.assert_array_equal(out, (z > theta).astype(np.float64))
    np.testing.assert_array_equal(gz, np.zeros_like(z))  # the L0 term trains theta only
    expected = (g * -(1.0 / eps) * rect((z - theta) / eps)).sum(axis=0)
    np.testing.assert_allclose(gt, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(ste_case(), st.sampled_from([R.jumprelu, R.step]))
def test_threshold_gradient_is_zero_outside_the_window(case, fn):
    z, theta, g, eps = case
    outside = rect((z - theta) / eps) == 0
    _, _, gt = grads(fn, z, theta, np.where(outside, g, 0.0), eps)
    np.testing.assert_array_equal(gt, np.zeros_like(theta))


@settings(max_examples=100, deadline=None)
@given(ste_case(), st.sampled_from([R.jumprelu, R.step]))
def test_threshold_gradient_sums_over_the_batch(case, fn):
    z, theta, g, eps = case
    total = grads(fn, z, theta, g, eps)[2]
    per_row = sum(grads(fn, z[i : i + 1], theta, g[i : i + 1], eps)[2] for i in range(z.shape[0]))
    np.testing.assert_allclose(total, per_row, rtol=1e-12, atol=1e-12)


def test_window_is_open_at_its_edges():
    theta, eps = np.array([1.0]), 0.5
    z = np.array([[1.0 - 0.25], [1.0 + 0.25], [1.0 + 0.2499]])  # u = -0.5 and +0.5 exactly are outside
    _, _, gt = grads(R.step, z, theta, np.ones_like(z), eps)
    np.testing.assert_allclose(gt, [-(1.0 / eps)])


def _params(d_in: int, d_sae: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=g, dtype=torch.float64),
        "b_enc": torch.randn(d_sae, generator=g, dtype=torch.float64) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=g, dtype=torch.float64),
        "b_dec": torch.randn(d_in, generator=g, dtype=torch.float64),
        "threshold": torch.rand(d_sae, generator=g, dtype=torch.float64) + 0.5,
    }


def test_sae_forward_matches_the_formulas():
    p = _params(5, 13)
    x = torch.randn(11, 5, dtype=torch.float64)
    out = R.sae_forward(x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], p["threshold"], 0.01)
    z = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]  # pre-encoder bias: b_dec subtracted first
    f = torch.where(z > p["threshold"], z, 0.0)
    torch.testing.assert_close(out.x_hat, f @ p["W_dec"] + p["b_dec"], rtol=0, atol=0)
    torch.testing.assert_close(out.l0, (z > p["threshold"]).sum(-1).double(), rtol=0, atol=0)
    # The compact active set lists exactly the fired latents with their values, padded with (0, 0).
    assert out.indices.shape[1] == int(out.l0.max())
    dense = torch.zeros_like(f).scatter_add_(1, out.indices, out.values)
    torch.testing.assert_close(dense, f, rtol=0, atol=0)
    torch.testing.assert_close(
        R.decode_sparse(out.indices, out.values, p["W_dec"], p["b_dec"]), out.x_hat, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("kind", ["l0", "target_l0"])
def test_objective_threshold_gradients_match_the_chain_rule(kind):
    """d loss / d theta through sae_forward for both sparsity objectives, against the closed form."""
    from sae.objectives import sae_loss

    eps, lam, target = 0.5, 0.7, 3.0
    p = {k: v.requires_grad_() for k, v in _params(6, 10, seed=3).items()}
    x = torch.randn(32, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    out = R.sae_forward(x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], p["threshold"], eps)
    sae_loss(x, out.x_hat, out.l0, kind, lam, target).total.backward()

    with torch.no_grad():
        theta = p["threshold"]
        z = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        window = (((z - theta) / eps).abs() < 0.5).double()
        grad_xhat = -2.0 * (x - out.x_hat) / x.shape[0]  # d MSE / d x_hat
        grad_f = grad_xhat @ p["W_dec"].T  # dL/df at every pair: one decoder row per latent
        rec = (grad_f * -(theta / eps) * window).sum(0)
        d_mean_l0 = (-(1.0 / eps) * window).sum(0) / x.shape[0]
        mean_l0 = (z > theta).double().sum(-1).mean()
        outer = lam if kind == "l0" else lam * 2.0 * (mean_l0 / target - 1.0) / target
        expected = rec + outer * d_mean_l0
    torch.testing.assert_close(p["threshold"].grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p, x: (p.update(W_dec=p["W_dec"][:, :-1]), x)[1], "W_dec has shape"),
        (lambda p, x: (p.update(threshold=p["threshold"][:-1]), x)[1], "threshold has shape"),
        (lambda p, x: x[:, :-1], "x has shape"),
        (lambda p, x: x[None], "x must be"),
        (lambda p, x: (p.update(b_enc=p["b_enc"].long()), x)[1], "floating-point"),
        (
            lambda p, x: (p.update(threshold=p["threshold"].index_fill(0, torch.tensor([3]), 0.0)), x)[1],
            r"threshold must be > 0 \(JumpReLU needs theta > 0\): 1 of 6 entries are <= 0 or NaN, e.g. latent 3",
        ),
    ],
)
def test_bad_inputs_name_the_problem(change, message):
    p = _params(4, 6)
    x = change(p, torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=message):
        R.sae_forward(x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], p["threshold"], 0.1)


@pytest.mark.parametrize("bandwidth", [0.0, float("inf"), float("nan")])
def test_bandwidth_must_be_finite_and_positive(bandwidth):
    p = _params(4, 6)
    with pytest.raises(ValueError, match="bandwidth must be a finite number > 0"):
        R.sae_forward(torch.randn(3, 4, dtype=torch.float64), *p.values(), bandwidth)


def test_compute_dtype_rounds_the_operands_and_passes_gradients_straight_through():
    """r(t) = t rounded to compute_dtype, kept in t's dtype; d r(t) / d t = 1 (module docstring)."""
    t = torch.tensor([1.0 + 2.0**-12, 3.0], dtype=torch.float64, requires_grad=True)
    r = R.operand(t, torch.bfloat16)
    assert r.dtype == torch.float64 and r.tolist() == [1.0, 3.0]
    r.backward(torch.tensor([0.25, -2.0], dtype=torch.float64))
    assert t.grad.tolist() == [0.25, -2.0]
    assert R.operand(t, None) is t and R.operand(t, torch.float64) is t
    p = _params(4, 6)
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        R.sae_forward(torch.randn(3, 4, dtype=torch.float64), *p.values(), 0.1, compute_dtype=torch.int8)


def test_l0_is_an_fp32_count_for_16_bit_inputs():
    """601 latents firing is not a bf16 number (bf16 has 8 significant bits): the count is summed in fp32."""
    p = {k: v.to(torch.bfloat16) for k, v in _params(4, 601).items()}
    p["b_enc"] = p["b_enc"] + 100.0
    out = R.sae_forward(torch.zeros(2, 4, dtype=torch.bfloat16), *p.values(), 0.1)
    assert out.l0.dtype == torch.float32 and out.l0.tolist() == [601.0, 601.0]
