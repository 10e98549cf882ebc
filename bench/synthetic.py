"""Synthetic SAE workloads whose L0 is about K, and whose first rows are safe to check on.

Parameters follow the RECIPES init (W_dec rows He-uniform then unit norm, W_enc = W_dec^T) with small random
biases (b_dec a 16-bit number, see (2) below); x [B, D] is standard normal, so E||x||^2 = D as after the trainer's
scaling and every pre-activation z is roughly N(0, 1). The thresholds are the (1 - K/F) quantile of z (jittered
by +-5% per latent), so each row has about K active latents whatever F is (at F = 2^20 most latents fire on no
row of a batch, as in a real wide SAE), and about K * theta * eps pairs fall in the STE window.

The first `check_rows` rows are made safe for equivalence checks: no pre-activation lies within `margin` of a
decision boundary (z = theta, z = theta +- eps/2), so that rounding cannot flip who fires or who is in the
window between an implementation and its oracle. Thresholds of latents with a pair nearer than that are moved
at random until none is. Two sets of pre-activations are kept away from the boundaries, because the checks
compare each implementation with an oracle that rounds at the same points (bench/checks.py):

    z   = (x - b_dec) W_enc + b_enc                     exact (float64 from the float32 parameters): fp32 cases
    z16 = r(r(x) - b_dec) r(W_enc) + b_enc              r = rounding to compute_dtype (bf16, fp16), float64 sums:
                                                        the 16-bit cases (`kernels.reference` at compute_dtype)

The operand rounding that separates z16 from z (relative UNIT = 2^-8 per bf16 operand, three operands x, x - b_dec,
W_enc) is not inside the margin, because it cannot be: over the D terms it is at most 3 UNIT z~, z~ =
sum_d |x_c,d W_d,j| + |b_enc,j| (about 33 at D = 2304, so 0.4), and it is measured at 2e-3 (standard deviation)
and 1e-2 (largest over 128 rows) at D = 64 to 2304: 2 to 400 times the STE bandwidth eps = 0.001 of the Gemma
sizes, while a margin must stay below eps / 8 for thresholds to exist. It is taken out of the comparison instead:
the 16-bit oracle rounds the same operands, so z16 (which differs from z in the decisions of dozens of pairs per
128 rows) is a set of pre-activations of its own, with its own touched latents (`check_latents`). What remains
between a 16-bit implementation (the kernels: fp32 x - b_dec rounded, 16-bit products, fp32 accumulation) and its
float64 oracle is:

    (1) the products: two p-bit operands (p = 8 bf16, 11 fp16) give 2p <= 22 significant bits, exact in fp32;
    (2) x - b_dec: the kernels and the float32 oracle round the float32 difference fl(r(x) - b_dec), the float64
        oracle the exact one. When r(x) and b_dec are both p-bit numbers these round to the same 16-bit value:
        either the difference is exact in fp32, or the exponents are more than 24 - p apart and the difference
        lies within the smaller operand of a 16-bit grid point, far from any rounding midpoint. So b_dec is made
        bf16- and fp16-exact (rounded to bf16, |b_dec| < 2^-14 flushed to zero: 8 significant bits inside
        fp16's normal range). With float32 b_dec 1 in 10^5 differences (bf16; fp16: 1 in 10^4) round the other way
        (measured on N(0, 1) - N(0, 0.01)), each moving every z16 of its row by 2 UNIT |x_c,d W_d,j| (~1e-4);
    (3) fp32 accumulation of D + 1 terms in another order, the same as for z. Its worst case gamma_(D+1) z~
        (4.5e-3 at D = 2304) again exceeds eps / 8, while the actual error is ~1e-6: the margin is measured.

margin = 32 x the largest error of torch's float32 z and z16 (both 16-bit dtypes) against their float64 values,
over the check rows and 4096 sampled latents (the factor covers the other latents, whose extreme value grows
like sqrt(2 ln n), and another summation order).

`wide_window` makes a third setting for the torch.autocast step, whose pre-activations round at other points.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from bench.shapes import Shape
from kernels import reference as R

_COLUMNS = 2**16  # latents per chunk of the float64 passes: [D, 65536] float64 = 1.2 GB at D = 2304
COMPUTE_16 = (torch.bfloat16, torch.float16)  # the 16-bit operand dtypes whose decisions are kept safe


class SAEData(NamedTuple):
    shape: Shape
    x: Tensor  # [B, D] fp32
    W_enc: Tensor  # [D, F]
    b_enc: Tensor  # [F]
    W_dec: Tensor  # [F, D] unit rows
    b_dec: Tensor  # [D] bf16- and fp16-exact values
    threshold: Tensor  # [F]
    check_rows: int  # rows [0, check_rows) of x are boundary-safe
    check_touched: Tensor  # [T] int64 ascending: latents that fire or have a window pair in the check rows (z)
    margin: float
    mean_l0: float  # over all B rows: mean active latents per row
    max_l0: int
    mean_window: float  # mean STE-window pairs per row
    touched: int  # latents that fire or have a window pair in the B rows
    check_touched16: dict[torch.dtype, Tensor]  # as check_touched, for z16 at each dtype of COMPUTE_16

    def params(self) -> dict[str, Tensor]:
        return {
            "W_enc": self.W_enc,
            "b_enc": self.b_enc,
            "W_dec": self.W_dec,
            "b_dec": self.b_dec,
            "threshold": self.threshold,
        }

    def check_latents(self, compute_dtype: torch.dtype | None = None) -> Tensor:
        """The touched latents of the check rows for an oracle at `compute_dtype` (None: exact operands)."""
        return self.check_touched if compute_dtype is None else self.check_touched16[compute_dtype]


@torch.no_grad()
def pre_activations(
    x: Tensor,
    b_dec: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    cols: slice,
    dtype: torch.dtype,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """z [R, cols] = (x - b_dec) W_enc + b_enc of the latents `cols`, computed in `dtype` by
    `kernels.reference.encode` at `compute_dtype`.

    The reference has no public function for z alone, so this takes it from `encode` with every threshold at
    -inf, where JumpReLU is the identity (z * H(z + inf) = z * 1, exactly): the reference's own arithmetic,
    operand rounding included, not a copy of it. That costs about three [R, cols] temporaries beside z (the
    step and its L0), so callers take wide SAEs a chunk of latents at a time (`all_pre_activations`).
    """
    b = b_enc[cols].to(dtype)
    no_threshold = torch.full_like(b, -math.inf)
    return R.encode(x.to(dtype), W_enc[:, cols].to(dtype), b, b_dec.to(dtype), no_threshold, 1.0, compute_dtype).acts


def all_pre_activations(
    x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, dtype: torch.dtype, compute_dtype: torch.dtype | None = None
) -> Tensor:
    """z [R, F] in `dtype` (`pre_activations` of every latent), _COLUMNS latents at a time, so that the
    reference's temporaries stay at one chunk (float64 W_enc alone is 19 GB at F = 2^20)."""
    F = W_enc.shape[1]
    z = torch.empty(x.shape[0], F, dtype=dtype, device=x.device)
    for c0 in range(0, F, _COLUMNS):
        cols = slice(c0, min(F, c0 + _COLUMNS))
        z[:, cols] = pre_activations(x, b_dec, W_enc, b_enc, cols, dtype, compute_dtype)
    return z


def sixteen_bit_exact(t: Tensor) -> Tensor:
    """t rounded to bf16, magnitudes below 2^-14 flushed to 0: exact in bf16, fp16 and fp32 (module docstring)."""
    t = t.to(torch.bfloat16).float()
    return torch.where(t.abs() < 2.0**-14, torch.zeros_like(t), t)


def _move_thresholds(
    zs: list[Tensor], theta: Tensor, eps: float, margins: list[float | Tensor], g: torch.Generator
) -> None:
    """Move (in place) the thresholds of the latents that have a pre-activation in any of `zs` [R, n] float64
    nearer a boundary than its margin (a float, or one per pair [R, n]), at random by up to eps / 2, until none
    has."""
    for _ in range(100):
        bad = torch.zeros(theta.shape[0], dtype=torch.bool, device=theta.device)
        for z, margin in zip(zs, margins):
            d = (z - theta.double()).abs_()
            bad |= ((d < margin) | ((d - eps / 2).abs_() < margin)).any(0)
        if not bad.any():
            return
        step = (torch.rand(int(bad.sum()), generator=g, device=theta.device) - 0.5) * eps
        theta[bad] = (theta[bad] + step).clamp_min(1e-3)
    raise RuntimeError("could not move the thresholds away from every pre-activation of the check rows")


def _touched(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    """[n] bool: fires or has a window pair in some row of z [R, n]."""
    d = z - theta.double()
    return ((d > 0) | ((d / eps).abs() < 0.5)).any(0)


def make_sae_data(shape: Shape, device: torch.device, check_rows: int, seed: int = 0) -> SAEData:
    B, D, F, K, eps = shape
    R_ = min(B, check_rows)
    g = torch.Generator(device=device).manual_seed(seed)
    W_dec = torch.rand(F, D, generator=g, device=device).mul_(2).sub_(1)
    W_dec.div_(W_dec.norm(dim=1, keepdim=True))
    W_enc = W_dec.t().contiguous()
    x = torch.randn(B, D, generator=g, device=device)
    b_dec = sixteen_bit_exact(0.1 * torch.randn(D, generator=g, device=device))
    b_enc = 0.1 * torch.randn(F, generator=g, device=device)
    xr = x[:R_]
    settings = (None, *COMPUTE_16)  # exact operands, then each 16-bit compute dtype

    # Threshold level from a sample of latents (they are exchangeable), and the fp32 error of z and z16 there.
    sample = torch.randperm(F, generator=torch.Generator().manual_seed(seed))[:4096].to(device)
    w, b = W_enc[:, sample], b_enc[sample]
    z64 = pre_activations(xr, b_dec, w, b, slice(None), torch.float64)
    z_err = 0.0
    for cd in settings:
        ref = z64 if cd is None else pre_activations(xr, b_dec, w, b, slice(None), torch.float64, cd)
        got = pre_activations(xr, b_dec, w, b, slice(None), torch.float32, cd)
        z_err = max(z_err, (got.double() - ref).abs().max().item())
    margin = max(32 * z_err, 1e-7)
    if margin >= eps / 8:
        raise ValueError(f"eps={eps} is too narrow for the float32 error of z ({z_err:.1e}) at this shape")
    flat = z64.flatten()
    flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[: 2**22].to(device)]
    level = torch.quantile(flat, 1.0 - K / F).item()
    jitter = torch.rand(F, generator=g, device=device) - 0.5
    threshold = (level * (1.0 + 0.1 * jitter)).clamp_min(1e-3)

    check_touched = {cd: torch.zeros(F, dtype=torch.bool, device=device) for cd in settings}
    cols_per_chunk = min(F, _COLUMNS, max(1, 2**26 // max(R_, 1)))
    for c0 in range(0, F, cols_per_chunk):
        cols = slice(c0, min(F, c0 + cols_per_chunk))
        zs = [pre_activations(xr, b_dec, W_enc, b_enc, cols, torch.float64, cd) for cd in settings]
        theta = threshold[cols]  # a view: moves write into `threshold`
        _move_thresholds(zs, theta, eps, [margin] * len(zs), g)
        for cd, z in zip(settings, zs):
            check_touched[cd][cols] = _touched(z, theta, eps)

    l0 = torch.zeros(B, device=device)
    window = torch.zeros(B, device=device)
    touched = torch.zeros(F, dtype=torch.bool, device=device)
    rows_per_chunk = max(1, 2**28 // cols_per_chunk)
    for c0 in range(0, F, cols_per_chunk):
        cols = slice(c0, min(F, c0 + cols_per_chunk))
        for r0 in range(0, B, rows_per_chunk):
            rows = slice(r0, min(B, r0 + rows_per_chunk))
            z = pre_activations(x[rows], b_dec, W_enc, b_enc, cols, torch.float32)
            u = (z - threshold[cols]) / eps
            fires, inside = z > threshold[cols], (u > -0.5) & (u < 0.5)
            l0[rows] += fires.sum(1)
            window[rows] += inside.sum(1)
            touched[cols] |= (fires | inside).any(0)
    latents = {cd: t.nonzero().squeeze(1) for cd, t in check_touched.items()}
    return SAEData(
        shape, x, W_enc, b_enc, W_dec, b_dec, threshold, R_, latents.pop(None), margin,
        l0.mean().item(), int(l0.max().item()), window.mean().item(), int(touched.sum()), latents,
    )  # fmt: skip


class WideWindow(NamedTuple):
    """A check setting for the torch.autocast step (`wide_window`): the data's parameters with these thresholds
    and this STE bandwidth, on rows [0, rows) of x."""

    threshold: Tensor  # [F] the data's thresholds, moved away from the pre-activations of the rows
    eps: float  # the STE bandwidth of the check
    rows: int
    touched: Tensor  # [T] int64 ascending: latents that fire or have a window pair in the rows
    delta: float  # the largest bound on |z_autocast - z| (each pair is kept clear of the boundaries by its own)


def wide_window(data: SAEData, rows: int, low: torch.dtype, seed: int = 1) -> WideWindow:
    """Thresholds and an STE bandwidth at which torch.autocast(dtype=low) takes the exact decisions on x[:rows].

    Under autocast the dense reference computes z_a = r(r(x - b_dec) r(W_enc)) + b_enc: the float32 difference
    x - b_dec and W_enc rounded to `low` (r), their product accumulated in float32 and rounded to `low` (the output
    of an autocast matmul), b_enc added in float32. Per pair (b, j), with mm = r(x - b_dec) r(W_enc) summed in
    float64 (exact products) and UNIT the unit roundoff of `low` (2^-8 for bf16):

        |z_a - z|  <=  delta_bj  =  |mm + b_enc - z|  +  UNIT |mm|  +  data.margin

    The first term, the operand rounding, is computed here pair by pair (not bounded: its worst case 2 UNIT z~ ~
    0.26 at D = 2304 is far above any usable window); the second bounds the output rounding of the float32 sum
    (torch.compile may keep the sum in float32: the bound then holds with room); the third the float32
    accumulation (module docstring). delta = max delta_bj, 0.02 to 0.03 for bf16 (measured at D = 64 to 2304): 30
    times the Gemma sizes' eps = 0.001, at which autocast's window membership, and a few active pairs per row,
    differ from the exact step's (measured at the offline size, 128 rows: 46 of 4166 active pairs flipped, the
    W_enc gradient off by 64%). So the check uses eps = 2^ceil(log2(8 delta)) (the window is 8 delta wide, room
    for a pair inside it) and moves the thresholds until no exact z_bj of the rows lies within delta_bj of a
    boundary: autocast then takes the exact decisions, and its outputs differ from the exact step's by rounding
    alone (bench/cases_step.py bounds that).
    """
    F = data.shape.F
    unit = torch.finfo(low).eps / 2  # unit roundoff: 2^-8 for bf16
    xr = data.x[:rows]
    xc = R.operand(xr - data.b_dec, low).double()  # autocast's first operand: the float32 difference, rounded
    cols_per_chunk = min(F, _COLUMNS, max(1, 2**26 // max(rows, 1)))
    chunks = [slice(c0, min(F, c0 + cols_per_chunk)) for c0 in range(0, F, cols_per_chunk)]

    def bounds(cols: slice) -> tuple[Tensor, Tensor]:
        z = pre_activations(xr, data.b_dec, data.W_enc, data.b_enc, cols, torch.float64)
        mm = xc @ R.operand(data.W_enc[:, cols], low).double()
        return z, (mm + data.b_enc[cols].double() - z).abs_() + unit * mm.abs() + data.margin

    delta = max(bounds(cols)[1].max().item() for cols in chunks)
    eps = 2.0 ** math.ceil(math.log2(8 * delta))
    threshold = data.threshold.clone()
    g = torch.Generator(device=threshold.device).manual_seed(seed)
    touched = torch.zeros(F, dtype=torch.bool, device=threshold.device)
    for cols in chunks:
        z, dev = bounds(cols)
        theta = threshold[cols]  # a view: moves write into `threshold`
        _move_thresholds([z], theta, eps, [dev], g)
        touched[cols] = _touched(z, theta, eps)
    return WideWindow(threshold, eps, rows, touched.nonzero().squeeze(1), delta)


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


def slots_to_dense(idx: Tensor, n: Tensor, F: int, values: Tensor | None = None) -> Tensor:
    """The first n[r] slots of each row of idx [R, cap] (a kernel's compact per-row lists) as a dense [R, F]
    bool mask, or holding `values` [R, cap] where given."""
    R, cap = idx.shape
    used = torch.arange(cap, device=idx.device)[None, :] < n[:, None]
    rows = torch.arange(R, device=idx.device)[:, None].expand(R, cap)[used]
    out = torch.zeros(R, F, dtype=torch.bool if values is None else values.dtype, device=idx.device)
    out[rows, idx[used].long()] = True if values is None else values[used]
    return out
