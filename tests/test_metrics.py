"""Reconstruction, sparsity and dark-matter metrics against hand-computed cases and one-shot float64 formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kernels import reference as R
from sae.evaluation.dark_matter import DarkMatterAccumulator, LinearResidualFit, dark_matter
from sae.evaluation.metrics import FiringAccumulator, Moments, ReconstructionAccumulator


def chunks(n: int, sizes=(1, 7, 64, 3)):
    """Uneven chunk boundaries covering range(n): a streaming result must not depend on them."""
    out, start, i = [], 0, 0
    while start < n:
        stop = min(start + sizes[i % len(sizes)], n)
        out.append(slice(start, stop))
        start, i = stop, i + 1
    return out


def reconstruct(x, x_hat, sizes=(1, 7, 64, 3)):
    acc = ReconstructionAccumulator()
    for s in chunks(len(x), sizes):
        acc.update(x[s], x_hat[s])
    return acc.result()


# --- reconstruction -----------------------------------------------------------------------------------


def test_fvu_hand_case_with_a_large_offset():
    # u = the 4 corners of a 2x2 square: mean (1, 1), sum ||u - mean||^2 = 4 * 2 = 8.
    u = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]], dtype=torch.float64)
    offset = torch.tensor([1000.0, -500.0], dtype=torch.float64)
    x = u + offset
    x_hat = x + torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # SSE = 2
    r = reconstruct(x, x_hat, sizes=(1, 2))
    assert r.tokens == 4
    assert r.fvu == pytest.approx(2 / 8, rel=1e-15)
    assert r.explained_variance == pytest.approx(0.75, rel=1e-15)
    # About zero: sum ||offset + u||^2 = 4 ||offset||^2 + 2 offset . sum(u) + sum ||u||^2
    #           = 4 * 1,250,000 + 2 * (1000 * 4 - 500 * 4) + 16 = 5,004,016.
    assert r.fvu_about_zero == pytest.approx(2 / 5_004_016, rel=1e-12)
    assert r.explained_variance_about_zero == pytest.approx(1 - 2 / 5_004_016, rel=1e-15)
    assert r.mse == pytest.approx(0.5) and r.variance == pytest.approx(2.0)


def test_fvu_streaming_equals_one_shot_two_pass_float64():
    gen = torch.Generator().manual_seed(0)
    n, d = 300, 13
    x = torch.randn(n, d, generator=gen) * torch.linspace(0.1, 3, d)
    x[:, 4] += 1e6  # a huge constant offset on one dimension (RECIPES 7), unit-ish variance beside it
    x_hat = x + 0.3 * torch.randn(n, d, generator=gen)
    xn, xh = x.double().numpy(), x_hat.double().numpy()
    sse = ((xn - xh) ** 2).sum()
    expected = sse / ((xn - xn.mean(axis=0)) ** 2).sum()  # two-pass: exact up to float64 rounding
    one_shot = reconstruct(x, x_hat, sizes=(n,))
    streamed = reconstruct(x, x_hat)
    assert one_shot.fvu == pytest.approx(expected, rel=1e-10)
    # 1e-10 is far tighter than sum x^2 - n mean^2 can get here: that formula loses
    # log10(mean^2 / var) ~ 12 of float64's 16 digits on dimension 4.
    assert streamed.fvu == pytest.approx(expected, rel=1e-10)
    assert streamed.fvu_about_zero == pytest.approx(sse / (xn**2).sum(), rel=1e-12)
    assert streamed.fvu_about_zero < 1e-6 < streamed.fvu  # the offset makes the two conventions differ wildly


def test_moments_merge_matches_numpy():
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(101, 5, generator=gen, dtype=torch.float64) + 50
    m = Moments()
    for s in chunks(101):
        m.update(y[s])
    m.update(y[:0])  # an empty chunk changes nothing
    assert m.n == 101
    np.testing.assert_allclose(m.mean.numpy(), y.numpy().mean(0), rtol=1e-14)
    np.testing.assert_allclose(m.m2.numpy(), 101 * y.numpy().var(0), rtol=1e-11)
    np.testing.assert_allclose(m.sum_squares().numpy(), (y.numpy() ** 2).sum(0), rtol=1e-14)


def test_reconstruction_rejects_bad_input():
    acc = ReconstructionAccumulator()
    with pytest.raises(ValueError, match="no tokens"):
        acc.result()
    with pytest.raises(ValueError, match="one shape"):
        acc.update(torch.zeros(3, 2), torch.zeros(3, 3))
    acc.update(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="d_in"):
        acc.update(torch.zeros(3, 4), torch.zeros(3, 4))


# --- sparsity -------------------------------------------------------------------------------------------

# 10 tokens, 5 latents. Latent 0 never fires, 1 fires once (frequency 0.1, exactly the dense threshold),
# 2 on 5 tokens, 3 on all 10, 4 on 2. Mean L0 = (0 + 1 + 5 + 10 + 2) / 10 = 1.8.
FIRES = {1: [3], 2: [0, 2, 4, 6, 8], 3: list(range(10)), 4: [5, 9]}


def firing_pattern() -> torch.Tensor:
    acts = torch.zeros(10, 5)
    for latent, tokens in FIRES.items():
        acts[tokens, latent] = 0.5 + latent  # any non-zero value
    return acts


def check_pattern(s):
    assert s.tokens == 10
    assert s.mean_l0 == pytest.approx(1.8)
    assert s.fire_counts.tolist() == [0, 1, 5, 10, 2]
    assert s.dead_fraction == pytest.approx(1 / 5)
    assert s.dense_fraction == pytest.approx(3 / 5)  # strictly above 0.1: latents 2, 3, 4
    expected = [-math.inf, -1.0, math.log10(0.5), 0.0, math.log10(0.2)]
    np.testing.assert_allclose(s.log10_frequency.numpy(), expected, rtol=1e-12)


def test_firing_from_the_compact_active_set():
    acts = firing_pattern()
    acc = FiringAccumulator(5)
    for s in chunks(10, sizes=(3, 4)):
        l0 = (acts[s] != 0).sum(-1)
        indices, values = R.active_set(acts[s], l0)
        indices = torch.cat([indices, torch.zeros_like(indices[:, :2])], dim=1)  # padding slots: index 0,
        values = torch.cat([values, torch.zeros_like(values[:, :2])], dim=1)  # value 0; latent 0 stays dead
        acc.update(indices, values)
    check_pattern(acc.result(dense_threshold=0.1))


def test_firing_from_dense_acts_and_the_threshold_is_configurable():
    acc = FiringAccumulator(5)
    acts = firing_pattern()
    acc.update_dense(acts[:6])
    acc.update_dense(acts[6:])
    check_pattern(acc.result())
    assert acc.result(dense_threshold=0.3).dense_fraction == pytest.approx(2 / 5)  # latents 2 and 3
    assert acc.result(dense_threshold=0.05).dense_fraction == pytest.approx(4 / 5)


def test_frequency_histogram():
    acc = FiringAccumulator(5)
    acc.update_dense(firing_pattern())
    h = acc.result().histogram(bins=2)
    # Range [log10(1/10), 0] = [-1, 0]; log10 frequencies -1, -0.70 | -0.30, 0; the dead latent apart.
    np.testing.assert_allclose(h.edges.numpy(), [-1.0, -0.5, 0.0])
    assert h.counts.tolist() == [2, 2] and h.dead == 1
    h4 = acc.result().histogram(bins=4)  # edges -1, -0.75, -0.5, -0.25, 0
    assert h4.counts.tolist() == [1, 1, 1, 1]


def test_firing_of_a_real_sae_forward_counts_every_active_pair():
    gen = torch.Generator().manual_seed(2)
    d, f = 6, 40
    x = torch.randn(33, d, generator=gen)
    w_enc = torch.randn(d, f, generator=gen)
    out = R.sae_forward(x, w_enc, torch.zeros(f), w_enc.T.contiguous(), torch.zeros(d), torch.full((f,), 1.0), 0.01)
    acc = FiringAccumulator(f)
    acc.update(out.indices, out.values)
    dense_fired = (x @ w_enc) > 1.0
    assert torch.equal(acc.fire_counts, dense_fired.sum(0))
    assert acc.result().mean_l0 == pytest.approx(float(out.l0.mean()))


def test_firing_rejects_out_of_range_latents():
    acc = FiringAccumulator(4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        acc.update(torch.tensor([[4]]), torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match="no tokens"):
        acc.result()


# --- dark matter ----------------------------------------------------------------------------------------


def random_linear(gen, d, n):
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 2, d, dtype=torch.float64)
    x[:, 0] += 300.0  # offsets do not disturb the centred normal equations
    b0 = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
    c0 = torch.randn(d, generator=gen, dtype=torch.float64)
    return x, b0, c0


def pairs(x, x_hat, sizes=(50, 17, 128)):
    return [(x[s], x_hat[s]) for s in chunks(len(x), sizes)]


def test_exactly_linear_error_is_all_dark_matter_explained():
    gen = torch.Generator().manual_seed(3)
    d = 9
    x, b0, c0 = random_linear(gen, d, 1200)
    x_hat = x - (x @ b0 + c0)  # e = x @ b0 + c0 exactly
    result, fit = dark_matter(pairs(x[:800], x_hat[:800]), pairs(x[800:], x_hat[800:]))
    assert result.fit_tokens == 800 and result.test_tokens == 400
    # The ridge (1e-6 of the mean variance) shrinks B along the smallest-variance direction (0.25 against a
    # mean of ~1.6) by ~6e-6 relative: that, not rounding, sets this tolerance. test_streamed_fit_... has ridge 0.
    torch.testing.assert_close(fit.B, b0, rtol=0, atol=2e-5)
    assert result.r2_error == pytest.approx(1.0, abs=1e-6)
    assert result.r2_error_pooled == pytest.approx(1.0, abs=1e-6)
    assert result.fvu_nonlinear == pytest.approx(0.0, abs=1e-6)
    assert result.fvu > 0.1 and result.fvu_linear == pytest.approx(result.fvu, abs=1e-6)
    # FVU_nonlinear is the FVU of x_hat + x @ B + c, computed here independently:
    direct = reconstruct(x[800:], x_hat[800:] + fit.predict_error(x[800:])).fvu
    assert result.fvu_nonlinear == pytest.approx(direct, abs=1e-12)


def test_error_norm_regression_recovers_a_linear_norm():
    # ||e||^2 = a + x @ w exactly, with e itself not linear in x (its first component is a square root).
    gen = torch.Generator().manual_seed(4)
    d, n = 5, 1000
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    e = torch.zeros(n, d, dtype=torch.float64)
    e[:, 0] = (40.0 + x @ w).sqrt()
    result, fit = dark_matter(pairs(x[:600], x[:600] - e[:600]), pairs(x[600:], x[600:] - e[600:]), ridge=0.0)
    assert result.r2_error_norm == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(fit.w, w, rtol=0, atol=1e-8)
    assert fit.w0 == pytest.approx(40.0, abs=1e-8)
    assert result.r2_error < 1.0 - 1e-4  # the square root is not linear: R^2 of e stays below 1


def test_error_independent_of_x_has_no_linear_part():
    gen = torch.Generator().manual_seed(5)
    d, n = 8, 24000
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) + 5
    e = torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.5 + 0.1
    result, _ = dark_matter(pairs(x[:16000], x[:16000] - e[:16000], (4096,)), pairs(x[16000:], x[16000:] - e[16000:]))
    # Held out, noise fitted with D + 1 parameters costs about -(D + 1) / N_fit = -6e-4 of R^2.
    assert abs(result.r2_error) < 5e-3 and abs(result.r2_error_norm) < 5e-3
    # Only the constant mean error 0.1 is linearly predictable (by c): ||0.1||^2 * D / (D * var x = 8) = 0.01.
    assert result.fvu_linear == pytest.approx(0.01, abs=1e-3)
    assert result.fvu == pytest.approx(8 * (0.25 + 0.01) / 8, rel=0.05)


def test_streamed_fit_equals_one_shot_least_squares():
    gen = torch.Generator().manual_seed(6)
    d, n = 7, 500
    x, b0, c0 = random_linear(gen, d, n)
    x_hat = x - (x @ b0 + c0) - 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64) ** 2
    fitter = LinearResidualFit(ridge=0.0)
    for xs, xhs in pairs(x, x_hat):
        fitter.update(xs.float(), xhs.float())  # float32 chunks are accumulated in float64
    fit = fitter.solve()
    e = x.float().double() - x_hat.float().double()
    design = torch.cat([x.float().double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    target = torch.cat([e, e.pow(2).sum(1, keepdim=True)], dim=1)
    ref = torch.linalg.lstsq(design, target).solution
    torch.testing.assert_close(fit.B, ref[:d, :d], rtol=0, atol=1e-9)
    torch.testing.assert_close(fit.c, ref[d, :d], rtol=0, atol=1e-7)
    torch.testing.assert_close(fit.w, ref[:d, d], rtol=0, atol=1e-8)
    assert fit.w0 == pytest.approx(float(ref[d, d]), abs=1e-6)


def test_ridge_keeps_a_constant_dimension_solvable():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(200, 4, generator=gen, dtype=torch.float64)
    x[:, 2] = 7.0  # constant: C_xx is singular
    e = 0.5 * x[:, :1] + 0.01 * torch.randn(200, 4, generator=gen, dtype=torch.float64)
    result, fit = dark_matter(pairs(x[:150], x[:150] - e[:150]), pairs(x[150:], x[150:] - e[150:]))
    assert torch.isfinite(fit.B).all() and fit.B[2].abs().max() < 1e-6
    assert result.r2_error_pooled > 0.9


def test_held_out_accumulator_rejects_mismatched_width():
    fitter = LinearResidualFit()
    fitter.update(torch.randn(10, 3), torch.randn(10, 3))
    evaluator = DarkMatterAccumulator(fitter.solve())
    with pytest.raises(ValueError, match="d_in"):
        evaluator.update(torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(ValueError, match="no tokens"):
        evaluator.result()
    with pytest.raises(ValueError, match="no fit tokens"):
        LinearResidualFit().solve()
