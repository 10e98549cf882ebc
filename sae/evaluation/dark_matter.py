"""The linear part of an SAE's error ("dark matter", Engels et al. 2024; RECIPES 3).

Shapes: B tokens per chunk, D d_in; N_fit and N_test tokens in the two splits.

With e = x - x_hat, fit on one split of tokens, by least squares with an intercept,

    e       ~ x @ B + c            B [D, D], c [D]
    ||e||^2 ~ x @ w + w0           w [D],   w0 scalar

and report on a held-out split: the R^2 of the error vector (per dimension, then averaged), the R^2 of the
error norm ||e||^2, and FVU_nonlinear = FVU of (x_hat + x @ B + c) against x, i.e. the share of x's
variance (about its mean) that stays unexplained once the linearly predictable part of the error is added
back. FVU - FVU_nonlinear is the linearly predictable part of the SAE's FVU.

The fit streams: the normal equations are accumulated in float64 in centred form, as co-moments
C_xx = sum (x - mean x)(x - mean x)^T [D, D] and C_xy = sum (x - mean x)(y - mean y)^T [D, D + 1]
(y = [e, ||e||^2]), merged across chunks with Chan et al.'s pairwise update

    C = C_a + C_b + (n_a n_b / n) (mean_b - mean_a)(mean_b - mean_a)^T     (one factor per side for C_xy)

Centring is the intercept (its coefficient is not penalised) and it removes the huge constant offsets of
residual streams (RECIPES 7) before any product is formed, where raw X^T X would square them.
Memory: 8 (D^2 + D (D + 1)) bytes, 85 MB at D = 2304 (Gemma-2-2B).

Ridge: the solve is (C_xx + lambda I) [B, w] = C_xy with lambda = ridge * trace(C_xx) / D, i.e. `ridge`
relative to the mean eigenvalue of the centred covariance, so it does not depend on the activations' scale.
It shrinks the coefficient along a covariance eigendirection with eigenvalue s by s / (s + lambda): at the
default 1e-6 that is below 1e-4 for every direction holding more than 1% of the mean variance, and it keeps
the Cholesky solve defined when C_xx is singular (a constant dimension, N_fit <= D).

Split sizes: each target has D + 1 fitted coefficients, so noise fitted on the fit split costs the held-out
R^2 about (D + 1) / N_fit; use N_fit >= 100 D to keep that below 0.01. (Measured on the offline default,
D = 640: 1k fit tokens gave a held-out R^2 of -4, 18k gave 0.31 for the error vector and 0.56 for its norm.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from sae.evaluation.metrics import Moments, ReconstructionAccumulator, check_pair


class LinearResidual(NamedTuple):
    """The fitted linear maps, float64: e ~ x @ B + c and ||e||^2 ~ x @ w + w0."""

    B: Tensor  # [D, D]
    c: Tensor  # [D]
    w: Tensor  # [D]
    w0: float
    fit_tokens: int  # N_fit
    ridge: float  # relative ridge used (see the module docstring)

    def predict_error(self, x: Tensor) -> Tensor:
        """x [B, D] -> predicted error [B, D], float64."""
        return x.double() @ self.B + self.c

    def predict_norm(self, x: Tensor) -> Tensor:
        """x [B, D] -> predicted ||e||^2 [B], float64."""
        return x.double() @ self.w + self.w0


def _targets(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    """e = x - x_hat [B, D] and ||e||^2 [B], in float64."""
    e = x.double() - x_hat.double()
    return e, e.pow(2).sum(dim=1)


class LinearResidualFit:
    """Streams (x, x_hat) chunks of the fit split into centred normal equations; `solve()` fits."""

    def __init__(self, ridge: float = 1e-6) -> None:
        if not ridge >= 0:
            raise ValueError(f"ridge={ridge} must be >= 0 (it is relative to the mean variance per dimension)")
        self.ridge = ridge
        self.n = 0
        self.mean_x: Tensor | None = None  # [D]
        self.mean_y: Tensor | None = None  # [D + 1]: e, then ||e||^2
        self.cxx: Tensor | None = None  # [D, D]
        self.cxy: Tensor | None = None  # [D, D + 1]

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        check_pair(x, x_hat)
        n_b = x.shape[0]
        if n_b == 0:
            return
        if self.mean_x is not None and x.shape[1] != self.mean_x.shape[0]:
            raise ValueError(f"x has d_in={x.shape[1]} but earlier chunks had {self.mean_x.shape[0]}")
        e, norm = _targets(x, x_hat)
        x = x.double()
        y = torch.cat([e, norm[:, None]], dim=1)
        mx, my = x.mean(dim=0), y.mean(dim=0)
        xc = x - mx
        cxx, cxy = xc.T @ xc, xc.T @ (y - my)
        if self.mean_x is None:
            self.n, self.mean_x, self.mean_y, self.cxx, self.cxy = n_b, mx, my, cxx, cxy
            return
        n = self.n + n_b
        dx, dy = mx - self.mean_x, my - self.mean_y
        f = self.n * n_b / n
        self.cxx += cxx + f * torch.outer(dx, dx)
        self.cxy += cxy + f * torch.outer(dx, dy)
        self.mean_x += dx * (n_b / n)
        self.mean_y += dy * (n_b / n)
        self.n = n

    def solve(self) -> LinearResidual:
        if self.n == 0:
            raise ValueError("no fit tokens: update() the fit with at least one token first")
        d = self.cxx.shape[0]
        trace = float(self.cxx.diagonal().sum())
        lam = self.ridge * (trace / d if trace > 0 else 1.0)
        a = self.cxx + lam * torch.eye(d, dtype=self.cxx.dtype, device=self.cxx.device)
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            coef = torch.cholesky_solve(self.cxy, chol)
        else:  # ridge = 0 on a singular design: the minimum-norm least-squares solution
            coef = torch.linalg.lstsq(a.cpu(), self.cxy.cpu(), driver="gelsd").solution.to(a.device)
        intercept = self.mean_y - self.mean_x @ coef
        return LinearResidual(
            B=coef[:, :d], c=intercept[:d], w=coef[:, d], w0=float(intercept[d]), fit_tokens=self.n, ridge=self.ridge
        )


class DarkMatter(NamedTuple):
    """Held-out evaluation of a `LinearResidual` fit (all R^2 about the held-out means)."""

    fit_tokens: int  # N_fit
    test_tokens: int  # N_test
    r2_error: float  # mean over dimensions of R^2 of e_d; dimensions with zero held-out variance are skipped
    r2_error_pooled: float  # 1 - sum ||e - e_pred||^2 / sum ||e - mean(e)||^2
    r2_error_norm: float  # R^2 of ||e||^2
    fvu: float  # the SAE's own FVU on the held-out split
    fvu_nonlinear: float  # FVU of x_hat + x @ B + c: what no linear map of x can recover
    fvu_linear: float  # fvu - fvu_nonlinear: the linearly predictable part of the SAE's FVU


class DarkMatterAccumulator:
    """Streams (x, x_hat) chunks of the held-out split through a fitted `LinearResidual`."""

    def __init__(self, fit: LinearResidual) -> None:
        self.fit = fit
        self.reconstruction = ReconstructionAccumulator()  # FVU of x_hat, and the denominator of every FVU
        self.error_moments = Moments()  # per-dimension held-out moments of e (R^2 denominators)
        self.norm_moments = Moments()  # held-out moments of ||e||^2
        self.error_sse: Tensor | None = None  # [D] sum (e_d - e_pred_d)^2
        self.norm_sse = 0.0  # sum (||e||^2 - predicted)^2

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        check_pair(x, x_hat)
        if x.shape[1] != self.fit.B.shape[0]:
            raise ValueError(f"x has d_in={x.shape[1]} but the fit has d_in={self.fit.B.shape[0]}")
        x = x.to(self.fit.B.device)
        x_hat = x_hat.to(self.fit.B.device)
        e, norm = _targets(x, x_hat)
        sse = (e - self.fit.predict_error(x)).pow(2).sum(dim=0)
        self.error_sse = sse if self.error_sse is None else self.error_sse + sse
        self.norm_sse += float((norm - self.fit.predict_norm(x)).pow(2).sum())
        self.error_moments.update(e)
        self.norm_moments.update(norm[:, None])
        self.reconstruction.update(x, x_hat)

    def result(self) -> DarkMatter:
        base = self.reconstruction.result()  # raises when no held-out token was given
        m2 = self.error_moments.m2
        has_variance = m2 > 0
        per_dim = 1.0 - self.error_sse[has_variance] / m2[has_variance]
        total_m2 = float(m2.sum())
        norm_m2 = float(self.norm_moments.m2[0])
        # x - (x_hat + e_pred) = e - e_pred: the nonlinear FVU's numerator is the error fit's SSE.
        fvu_nonlinear = float(self.error_sse.sum()) / (base.variance * base.tokens) if base.variance > 0 else math.nan
        return DarkMatter(
            fit_tokens=self.fit.fit_tokens,
            test_tokens=base.tokens,
            r2_error=float(per_dim.mean()) if per_dim.numel() else math.nan,
            r2_error_pooled=1.0 - float(self.error_sse.sum()) / total_m2 if total_m2 > 0 else math.nan,
            r2_error_norm=1.0 - self.norm_sse / norm_m2 if norm_m2 > 0 else math.nan,
            fvu=base.fvu,
            fvu_nonlinear=fvu_nonlinear,
            fvu_linear=base.fvu - fvu_nonlinear,
        )


def dark_matter(
    fit_chunks: Iterable[tuple[Tensor, Tensor]], test_chunks: Iterable[tuple[Tensor, Tensor]], ridge: float = 1e-6
) -> tuple[DarkMatter, LinearResidual]:
    """Fit on the (x, x_hat) chunks [B, D] of one split, evaluate on another's; returns (result, fit)."""
    fitter = LinearResidualFit(ridge)
    for x, x_hat in fit_chunks:
        fitter.update(x, x_hat)
    fit = fitter.solve()
    evaluator = DarkMatterAccumulator(fit)
    for x, x_hat in test_chunks:
        evaluator.update(x, x_hat)
    return evaluator.result(), fit
