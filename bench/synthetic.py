"""Synthetic SAE workloads whose L0 is about K, and whose first rows are safe to check on.

Parameters follow the RECIPES init (W_dec rows He-uniform then unit norm, W_enc = W_dec^T) with small random
biases; x [B, D] is standard normal, so E||x||^2 = D as after the trainer's scaling and every pre-activation
z is roughly N(0, 1). The thresholds are the (1 - K/F) quantile of z (jittered by +-5% per latent), so each
row has about K active latents whatever F is (at F = 2^20 most latents fire on no row of a batch, as in a
real wide SAE), and about K * theta * eps pairs fall in the STE window.

The first `check_rows` rows are made safe for equivalence checks: no pre-activation (computed in float64
from the exact float32 parameters) lies within `margin` of a decision boundary (z = theta, z = theta +-
eps/2), so float32 rounding cannot flip who fires or who is in the window. Thresholds of latents with a
pair nearer than that are moved at random until none is. margin = 32 x the float32 error of z measured on
those rows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from bench.registry import Shape

_COLUMNS = 2**16  # latents per chunk of the float64 passes: [D, 65536] float64 = 1.2 GB at D = 2304


class SAEData(NamedTuple):
    shape: Shape
    x: Tensor  # [B, D] fp32
    W_enc: Tensor  # [D, F]
    b_enc: Tensor  # [F]
    W_dec: Tensor  # [F, D] unit rows
    b_dec: Tensor  # [D]
    threshold: Tensor  # [F]
    check_rows: int  # rows [0, check_rows) of x are boundary-safe
    check_touched: Tensor  # [T] int64 ascending: latents that fire or have a window pair in the check rows
    margin: float
    mean_l0: float  # over all B rows: mean active latents per row
    max_l0: int
    mean_window: float  # mean STE-window pairs per row
    touched: int  # latents that fire or have a window pair in the B rows

    def params(self) -> dict[str, Tensor]:
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec,
                "threshold": self.threshold}


def _pre(x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, cols: slice, dtype: torch.dtype) -> Tensor:
    return (x.to(dtype) - b_dec.to(dtype)) @ W_enc[:, cols].to(dtype) + b_enc[cols].to(dtype)


def make_sae_data(shape: Shape, device: torch.device, check_rows: int, seed: int = 0) -> SAEData:
    B, D, F, K, eps = shape
    R = min(B, check_rows)
    g = torch.Generator(device=device).manual_seed(seed)
    W_dec = torch.rand(F, D, generator=g, device=device).mul_(2).sub_(1)
    W_dec.div_(W_dec.norm(dim=1, keepdim=True))
    W_enc = W_dec.t().contiguous()
    x = torch.randn(B, D, generator=g, device=device)
    b_dec = 0.1 * torch.randn(D, generator=g, device=device)
    b_enc = 0.1 * torch.randn(F, generator=g, device=device)
    xr = x[:R]

    # Threshold level from a sample of latents (they are exchangeable), and the fp32 error of z there.
    sample = torch.randperm(F, generator=torch.Generator().manual_seed(seed))[:4096].to(device)
    z64 = (xr.double() - b_dec.double()) @ W_enc[:, sample].double() + b_enc[sample].double()
    z32 = (xr - b_dec) @ W_enc[:, sample] + b_enc[sample]
    margin = max(32 * (z32.double() - z64).abs().max().item(), 1e-7)
    if margin >= eps / 8:
        raise ValueError(f"eps={eps} is too narrow for the float32 error of z ({margin / 32:.1e}) at this shape")
    flat = z64.flatten()
    flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[: 2**22].to(device)]
    level = torch.quantile(flat, 1.0 - K / F).item()
    jitter = torch.rand(F, generator=g, device=device) - 0.5
    threshold = (level * (1.0 + 0.1 * jitter)).clamp_min(1e-3)

    check_touched = torch.zeros(F, dtype=torch.bool, device=device)
    cols_per_chunk = min(F, _COLUMNS, max(1, 2**26 // max(R, 1)))
    for c0 in range(0, F, cols_per_chunk):
        cols = slice(c0, min(F, c0 + cols_per_chunk))
        z = _pre(xr, b_dec, W_enc, b_enc, cols, torch.float64)
        theta = threshold[cols]  # a view: moves below write into `threshold`
        for _ in range(100):
            d = z - theta.double()
            bad = ((d.abs() < margin) | ((d.abs() - eps / 2).abs() < margin)).any(0)
            if not bad.any():
                break
            step = (torch.rand(int(bad.sum()), generator=g, device=device) - 0.5) * eps
            theta[bad] = (theta[bad] + step).clamp_min(1e-3)
        else:
            raise RuntimeError("could not move the thresholds away from every pre-activation of the check rows")
        u = d / eps
        check_touched[cols] = ((d > 0) | ((u > -0.5) & (u < 0.5))).any(0)

    l0 = torch.zeros(B, device=device)
    window = torch.zeros(B, device=device)
    touched = torch.zeros(F, dtype=torch.bool, device=device)
    rows_per_chunk = max(1, 2**28 // cols_per_chunk)
    for c0 in range(0, F, cols_per_chunk):
        cols = slice(c0, min(F, c0 + cols_per_chunk))
        for r0 in range(0, B, rows_per_chunk):
            rows = slice(r0, min(B, r0 + rows_per_chunk))
            z = _pre(x[rows], b_dec, W_enc, b_enc, cols, torch.float32)
            u = (z - threshold[cols]) / eps
            fires, inside = z > threshold[cols], (u > -0.5) & (u < 0.5)
            l0[rows] += fires.sum(1)
            window[rows] += inside.sum(1)
            touched[cols] |= (fires | inside).any(0)
    return SAEData(
        shape, x, W_enc, b_enc, W_dec, b_dec, threshold, R, check_touched.nonzero().squeeze(1), margin,
        l0.mean().item(), int(l0.max().item()), window.mean().item(), int(touched.sum()),
    )  # fmt: skip


def check_rows_for(shape: Shape, device: torch.device) -> int:
    """Rows used by the float64 checks: on CUDA up to 2^28 / F of them (an R x F float64 tensor stays at
    2 GiB: the whole batch up to F = 65536, so torch.compile compiles one shape for check and timing), at
    least 16; on the CPU at most 128."""
    if device.type == "cuda":
        return min(shape.B, max(16, 2**28 // shape.F))
    return min(shape.B, 128)


def capacity_after(max_l0: int, F: int) -> int:
    """The encode's slots per row that the trainer uses after a step whose largest row L0 was max_l0."""
    return min(F, max(8, math.ceil(1.25 * max_l0)))
