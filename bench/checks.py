"""Equivalence checks: an implementation against the PyTorch reference, before anything is timed.

Precision rule (flash-attention's, as in tests/test_kernels_common.py): each output's error against the
reference computed in float64, relative to the float64 value's largest magnitude, may be at most twice the
error of PyTorch computing the same thing in the implementation's dtype, plus a floor of 64 roundoffs of that
dtype. Discrete outputs (active sets, L0, window membership, touched latents) must be equal; the synthetic
inputs (bench/synthetic.py) keep every pre-activation far from a decision boundary so that they can be.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

FLOOR = {torch.float32: 2.0**-18, torch.float16: 2.0**-4, torch.bfloat16: 2.0**-1}
"""64 units of roundoff of each dtype (64 * 2^-24 for float32)."""


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


class Comparison:
    """Collects comparisons of named outputs; `result()` gives the Check."""

    def __init__(self, shape: str, dtype: torch.dtype = torch.float32):
        self.shape, self.floor = shape, FLOOR[dtype]
        self.errors: dict[str, dict[str, float]] = {}
        self.failures: list[tuple[float, str]] = []

    def rule(self, name: str, got: Tensor | float, ref32: Tensor | float, ref64: Tensor | float) -> None:
        """The precision rule: error(got) <= 2 * error(ref32) + floor, both against ref64."""
        err, torch_err = scaled_err(got, ref64), scaled_err(ref32, ref64)
        allowed = 2 * torch_err + self.floor
        self.errors[name] = {"error": err, "allowed": allowed}
        if not err <= allowed:
            message = f"{name}: error {err:.2e} > allowed {allowed:.2e} (2 x torch's {torch_err:.2e} + floor)"
            self.failures.append((err / allowed, message))

    def unchanged(self, name: str, err: float) -> None:
        """An output that must stay where it was, up to the floor (a scaled error computed by the caller)."""
        self.within(name, err, self.floor)

    def within(self, name: str, err: float, allowed: float) -> None:
        """A scaled error computed by the caller, against a bound stated by the caller."""
        self.errors[name] = {"error": err, "allowed": allowed}
        if not err <= allowed:
            self.failures.append((err / allowed if allowed > 0 else float("inf"),
                                  f"{name}: error {err:.2e} > allowed {allowed:.1e}"))

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
