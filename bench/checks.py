"""Equivalence checks: an implementation against the PyTorch reference, before anything is timed.

Precision rule (flash-attention's, made condition-aware as in tests/test_kernels_common.py `assert_matches`,
ported here because a bench does not import tests/): elementwise, against the reference computed in float64,

    |got - ref64|_e  <=  2 max_e' |ref32 - ref64|_e'  +  FLOOR * max(S, M_e),     S = max |ref64|,

where ref32 is PyTorch computing the same thing in float32 and M_e the magnitude of element e (the same
computation on the absolute values of every input and intermediate, every subtraction made an addition,
in float64: `step_magnitudes`); without M, S alone (the rule as first written). FLOOR = 2^-18 is 64 float32
unit roundoffs u32 = 2^-24: evaluated in float32 in any order, a nested sum y of products has
|y_computed - y| <= gamma_N M (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 3.1-3.5) with
N the roundings on its longest chain, typically ~sqrt(N / 3) u32 M for rounding errors of random sign: far
inside 64 u32 M for the blocked sums of torch and the kernels. Where the output cancels (M >> |y|), torch's own
error on it may be small by luck, and 2 x torch's error alone would fail an equally good summation order; M
bounds what any order may do. Self-check: torch's own error must satisfy |ref32 - ref64|_e <= FLOOR * M_e, else
the magnitude model misses a term (and would pass wrong implementations). Where M_e <= S the rule is the plain
one; the training-step check passes M for the gradients, whose elements cancel (b_dec's two sums, theta's two
paths, a latent's few random-sign pairs), as the kernel tests do.

The rule is the same for implementations whose products take 16-bit operands (compute_dtype bf16 or fp16 with
fp32 accumulation) when their oracle rounds the same operands (`kernels.reference` with that compute_dtype, in
float32 and float64): the two then differ only in fp32 summation order, a 16-bit product being exact in fp32.
There is no looser 16-bit floor. Implementations that round at other points (torch.autocast) are compared with
an explicit bound of their own (`Comparison.within`, derived where it is used: bench/cases_step.py).

Discrete outputs (active sets, L0, window membership, touched latents) must be equal; the synthetic inputs
(bench/synthetic.py) keep every pre-activation far from a decision boundary so that they can be.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from bench.synthetic import all_pre_activations

FLOOR = 2.0**-18
"""64 float32 unit roundoffs (64 * 2^-24)."""
U32 = 2.0**-24  # float32 unit roundoff
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
"""Unit roundoff of the 16-bit operand dtypes: |r(t) - t| <= UNIT |t| (8 and 11 significant bits)."""


class Check(NamedTuple):
    """The outcome of one case's check; `errors` holds every compared output by name."""

    ok: bool
    errors: dict[str, dict[str, float]]  # name: {"error": e, "allowed": a}; exact ones count differing elements
    failures: list[str]  # human-readable, the worst first
    shape: str  # what was checked, e.g. "B=128 D=640 F=2560"
    note: str = ""

    def summary(self) -> str:
        return self.failures[0] if self.failures else "ok"


def scaled_err(got: Tensor | float, ref64: Tensor | float) -> float:
    """max |got - ref| / max |ref| (or the absolute error when ref is all zero), computed in float64."""
    got = torch.as_tensor(got).detach()
    ref = torch.as_tensor(ref64).detach()
    if got.shape != ref.shape:
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    got, ref = got.to(ref.device, torch.float64), ref.to(torch.float64)
    diff = (got - ref).abs().max().item()
    if math.isnan(diff):  # NaN never passes
        return float("inf")
    scale = ref.abs().max().item()
    return diff / scale if scale > 0 else diff


def _f64(t: Tensor | float, device: torch.device | None = None) -> Tensor:
    t = torch.as_tensor(t).detach()
    return t.to(device or t.device, torch.float64)


class Comparison:
    """Collects comparisons of named outputs; `result()` gives the Check.

    Reported per output: "error" and "allowed" at its worst element (the largest error / allowed ratio), both
    relative to the float64 value's largest magnitude S; the output passes iff error <= allowed there.
    """

    def __init__(self, shape: str):
        self.shape = shape
        self.errors: dict[str, dict[str, float]] = {}
        self.failures: list[tuple[float, str]] = []

    def rule(
        self,
        name: str,
        got: Tensor | float,
        ref32: Tensor | float,
        ref64: Tensor | float,
        magnitude: Tensor | float | None = None,
    ) -> None:
        """The precision rule (module docstring), with the magnitudes M of ref64's elements if given."""
        ref = _f64(ref64)
        got, ref32 = _f64(got, ref.device), _f64(ref32, ref.device)
        if got.shape != ref.shape or ref32.shape != ref.shape:
            self.errors[name] = {"error": float("inf"), "allowed": 0.0}
            self.failures.append((float("inf"), f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"))
            return
        if not ref.numel():
            self.errors[name] = {"error": 0.0, "allowed": 0.0}
            return
        torch_err = (ref32 - ref).abs_()
        torch_max = torch_err.max().item()
        S = ref.abs().max().item() or 1.0
        if magnitude is None:
            allowed = torch.tensor(2 * torch_max + FLOOR * S, dtype=torch.float64, device=ref.device)
        else:
            magnitude = _f64(magnitude, ref.device)
            allowed = magnitude.clamp(min=S).mul_(FLOOR).add_(2 * torch_max)
        which = "magnitude" if magnitude is not None else "S"
        self._elementwise(name, (got - ref).abs_(), allowed, S, f"2 x torch's {torch_max / S:.2e} + 2^-18 x {which}")
        if magnitude is not None and not bool((torch_err <= FLOOR * magnitude).all()):
            message = f"{name}: torch's own float32 error exceeds 2^-18 x magnitude: the magnitude model misses a term"
            self.failures.append((float("inf"), message))

    def _elementwise(self, name: str, err: Tensor, allowed: Tensor, S: float, how: str) -> None:
        ratio = (err / allowed).masked_fill_(err == 0, 0.0).nan_to_num_(nan=float("inf"))  # NaN never passes
        worst = int(ratio.flatten().argmax())
        e, a = err.flatten()[worst].item(), allowed.expand_as(err).flatten()[worst].item()
        self.errors[name] = {"error": e / S, "allowed": a / S}
        if ratio.flatten()[worst].item() > 1:
            where = f" at element {worst}" if err.numel() > 1 else ""
            message = f"{name}: error {e / S:.2e}{where} > allowed {a / S:.2e} ({how}; relative to max |ref| {S:.2e})"
            self.failures.append((ratio.flatten()[worst].item(), message))

    def unchanged(self, name: str, err: float) -> None:
        """An output that must stay where it was, up to FLOOR (a scaled error computed by the caller)."""
        self.within(name, err, FLOOR)

    def within(self, name: str, err: float, allowed: float) -> None:
        """A scaled error computed by the caller, against a bound stated by the caller."""
        self.errors[name] = {"error": err, "allowed": allowed}
        if not err <= allowed:
            self.failures.append(
                (err / allowed if allowed > 0 else float("inf"), f"{name}: error {err:.2e} > allowed {allowed:.1e}")
            )

    def exact(self, name: str, got: Tensor, want: Tensor) -> None:
        """Discrete outputs: equal element for element."""
        want = torch.as_tensor(want)
        got = torch.as_tensor(got).to(want.device, want.dtype)
        if got.shape != want.shape:
            wrong, detail = float("inf"), f"shape {tuple(got.shape)} != {tuple(want.shape)}"
        else:
            wrong = float((got != want).sum())
            detail = f"{int(wrong)} of {want.numel()} differ"
        self.errors[name] = {"error": wrong, "allowed": 0.0}
        if wrong:
            self.failures.append((float("inf"), f"{name}: not equal to the reference ({detail})"))

    def fail(self, message: str) -> None:
        self.failures.append((float("inf"), message))

    def result(self, note: str = "") -> Check:
        ordered = [m for _, m in sorted(self.failures, key=lambda f: -f[0])]
        return Check(not ordered, self.errors, ordered, self.shape, note)


@torch.no_grad()
def step_magnitudes(
    x: Tensor,
    params: dict[str, Tensor],
    eps: float,
    target: float,
    coefficient: float,
    compute_dtype: torch.dtype | None,
    max_norm: float,
    grad_norm: float,
    clipped: dict[str, Tensor],
) -> dict[str, Tensor]:
    """float64 magnitudes M of the gradients the training-step check compares (bench/cases_step.py), on x [R, D]
    and the parameters before the step, for the target-L0 objective (loss = mean_b ||x_b - x_hat_b||^2 +
    c (m / target - 1)^2, m the mean L0); decisions (H: fires, window: |z - theta| < eps / 2) from z as the oracle
    computes it at `compute_dtype`. With a~ = |a| (tests/test_kernels_common.py `magnitudes`, extended to the
    step's projection and clipping):

        xc~ = |x| + |b_dec|     f~ = (xc~ |W_enc| + |b_enc|) H     x_hat~ = f~ |W_dec| + |b_dec|
        g~  = 2 (|x| + x_hat~) / R   (dL/dx_hat)     df~ = g~ |W_dec|^T     dz~ = df~ H
        gradient W_enc~ = xc~^T dz~   b_enc~ = sum_b dz~   W_dec~ = f~^T g~   b_dec~ = sum_b g~ + sum_b dz~ |W_enc|^T
        gradient theta~ = (theta / eps) sum_b df~ window + (1 / eps) l0~ sum_b window,  l0~ = 2 c (m / target + 1)
                          / (target R)  (dL/dl0 per row)
        projected W_dec~ = W_dec~ + |w| (W_dec~ . |w|)  per row (g - (g . w) w, w the unit decoder row)
        grad_norm~ = (sum over every parameter and element of the projected M^2)^(1/2)   (| |a| - |b| | <= |a - b|)
        clipped gradient~ = s projected~ + |clipped| grad_norm~ / grad_norm   (clipped = s g, s = min(1, max_norm /
                            (grad_norm + 1e-6)): ds = s d grad_norm / grad_norm to first order)

    grad_norm and clipped are the float64 oracle's. Returns {name: M} for "gradient <param>" and "clipped gradient
    <param>". Peak memory about 18 bytes x R x F (two float64 and two bool [R, F]).
    """
    p = {k: v.detach().double() for k, v in params.items()}
    a = {k: v.abs() for k, v in p.items()}
    x = x.detach().double()
    rows, theta = x.shape[0], p["threshold"]
    z = all_pre_activations(x, p["b_dec"], p["W_enc"], p["b_enc"], torch.float64, compute_dtype)
    H = z > theta
    window = ((z - theta) / eps).abs_() < 0.5
    del z
    m = H.sum(1, dtype=torch.float64).mean()
    xc = x.abs() + a["b_dec"]
    f = (xc @ a["W_enc"] + a["b_enc"]).mul_(H)
    g = 2.0 * (x.abs() + f @ a["W_dec"] + a["b_dec"]) / rows
    df = g @ a["W_dec"].T
    l0_up = 2.0 * coefficient * (m / target + 1.0) / (target * rows)
    M = {"threshold": (theta / eps) * (df * window).sum(0) + (l0_up / eps) * window.sum(0, dtype=torch.float64)}
    dz = df.mul_(H)
    M.update(W_enc=xc.T @ dz, b_enc=dz.sum(0), W_dec=f.T @ g, b_dec=g.sum(0) + (dz @ a["W_enc"].T).sum(0))
    del f, df, dz, H, window
    proj = dict(M, W_dec=M["W_dec"] + a["W_dec"] * (M["W_dec"] * a["W_dec"]).sum(1, keepdim=True))
    norm = torch.sqrt(sum(t.pow(2).sum() for t in proj.values()))
    scale = min(1.0, max_norm / (grad_norm + 1e-6))
    out = {f"gradient {k}": v for k, v in M.items()}
    out.update(
        {f"clipped gradient {k}": scale * proj[k] + clipped[k].detach().double().abs() * (norm / grad_norm) for k in M}
    )
    return out
