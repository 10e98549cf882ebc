"""Plain PyTorch reference of the JumpReLU SAE ops: the oracle every kernel is compared against.

Shapes (one letter convention across the project): B tokens, D d_in, F d_sae, K active slots per row.

    z      = (x - b_dec) @ W_enc + b_enc          [B, F]   pre-activations (pre-encoder bias b_dec)
    f      = z * H(z - theta)                     [B, F]   JumpReLU, H = Heaviside step
    x_hat  = f @ W_dec + b_dec                    [B, D]
    l0     = sum_j H(z_j - theta_j)               [B]

Straight-through pseudo-derivatives (RECIPES.md section 1), bandwidth eps, rectangle kernel
K(u) = 1 if -1/2 < u < 1/2 else 0:

    d f / d z          = H(z - theta)                        the only path into z, W_enc, b_enc, x
    d f / d theta      = -(theta / eps) * K((z - theta) / eps)
    d H / d z          = 0                                   the L0 term trains theta only
    d H / d theta      = -(1 / eps) * K((z - theta) / eps)

Threshold gradients are summed over every leading (token) dimension. l0 is a count: it is kept in at least
fp32 (bf16 counts above 256 are inexact).

Mixed precision (`compute_dtype`, e.g. bf16 on an H100): the products' operands x, x - b_dec, W_enc and W_dec
are rounded to compute_dtype, and everything else (b_enc, b_dec, theta, every accumulation, every gradient)
stays in the parameters' dtype (fp32 master weights):

    z      = r(r(x) - b_dec) @ r(W_enc) + b_enc            r(t) = t rounded to compute_dtype, kept in t's dtype
    x_hat  = f @ r(W_dec) + b_dec

A product of two bf16 values is exact in fp32, so this is bf16 products with fp32 accumulation, as the kernels'
tensor cores compute them; on fp64 parameters it is the same rounded operands with fp64 accumulation (the tests'
oracle). r passes gradients straight through in t's dtype (d r(t) / d t = 1), so gradients come back in the
masters' dtype and are taken at the rounded operands, as the kernels take them.

Memory traffic of the dense formulation (what the kernels avoid): `sae_forward` writes z and f, each
[B, F] (at B = 4096, F = 2^20 in fp32: 16 GiB each), and its backward reads them again and runs three more
[B, F] x [F, D]-sized products. The kernels share the signatures below and differ only in how they compute.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kernels.validate import (
    bad_threshold_count,
    check_compute_dtype,
    check_sae_inputs,
    check_threshold_values,
    rounds_to,
)


class Encoded(NamedTuple):
    """Result of `encode`: dense activations and the per-row L0 (differentiable w.r.t. the threshold)."""

    acts: Tensor  # [B, F] f = z * H(z - theta)
    l0: Tensor  # [B] number of active latents per row, >= fp32, STE gradient into theta only


class Forward(NamedTuple):
    """Result of `sae_forward`, the op every backend implements.

    Gradients flow through `x_hat` and `l0` only. The active set is returned compactly for statistics
    (fire counts, dead latents): row b's active latents are `indices[b, :l0[b]]` with values
    `values[b, :l0[b]]` in descending order; slots past a row's L0 hold index 0 and value 0.
    Active values are always > theta > 0, so `values > 0` marks the active slots.
    """

    x_hat: Tensor  # [B, D]
    l0: Tensor  # [B] fp32 (fp64 for fp64 inputs), whatever the operands' dtype
    indices: Tensor  # [B, K] int64, K = max row L0 in the batch (at least 1)
    values: Tensor  # [B, K] same dtype as x_hat


def _window(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Rectangle kernel K((z - theta) / eps) as z's dtype: 1 strictly inside the STE window."""
    u = (z - threshold) / bandwidth
    return ((u > -0.5) & (u < 0.5)).to(z.dtype)


def count_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a count of latents over `dtype` values: at least fp32 (bf16 is exact only up to 256)."""
    return torch.promote_types(dtype, torch.float32)


class _RoundTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, dtype: torch.dtype) -> Tensor:
        return t.to(dtype).to(t.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def operand(t: Tensor, compute_dtype: torch.dtype | None) -> Tensor:
    """t's values rounded to compute_dtype, in t's dtype, gradient passed straight through; t itself unless
    `rounds_to(t.dtype, compute_dtype)` (compute_dtype set, different and not wider)."""
    return _RoundTo.apply(t, compute_dtype) if rounds_to(t.dtype, compute_dtype) else t


def _sum_to_threshold(grad: Tensor) -> Tensor:
    """Sum a [..., F] gradient over every leading dimension into [F]."""
    return grad.reshape(-1, grad.shape[-1]).sum(0)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad_out * (z > threshold).to(z.dtype)
        pseudo = -(threshold / eps) * _window(z, threshold, eps)
        grad_threshold = _sum_to_threshold(grad_out * pseudo)
        return grad_z, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        pseudo = -(1.0 / eps) * _window(z, threshold, eps)
        grad_threshold = _sum_to_threshold(grad_out * pseudo)
        return torch.zeros_like(z), grad_threshold, None


def jumprelu(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU z * H(z - theta) with the straight-through threshold gradient.

    Args:
        z: [..., F] pre-activations.
        threshold: [F] thresholds theta (> 0).
        bandwidth: STE window width eps (> 0).
    """
    return _JumpReLU.apply(z, threshold, bandwidth)


def step(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Heaviside step H(z - theta) with the straight-through threshold gradient (zero gradient into z)."""
    return _Step.apply(z, threshold, bandwidth)


def encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: float,
    compute_dtype: torch.dtype | None = None,
) -> Encoded:
    """Encode x [B, D] into dense JumpReLU activations [B, F] and the per-row L0 [B] (module docstring)."""
    xc = operand(operand(x, compute_dtype) - b_dec, compute_dtype)
    z = xc @ operand(W_enc, compute_dtype) + b_enc
    l0 = step(z, threshold, bandwidth).sum(-1, dtype=count_dtype(z.dtype))
    return Encoded(jumprelu(z, threshold, bandwidth), l0)


def decode(acts: Tensor, W_dec: Tensor, b_dec: Tensor, compute_dtype: torch.dtype | None = None) -> Tensor:
    """Reconstruct x_hat [B, D] = acts [B, F] @ W_dec [F, D] + b_dec [D]."""
    return acts @ operand(W_dec, compute_dtype) + b_dec


def active_set(acts: Tensor, l0: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
    """Compact (indices, values) [B, K] of the active latents of dense `acts`, K = max row L0 (>= 1).

    k: max(l0) if the caller has already read it back (one synchronisation fewer on a GPU).
    """
    if k is None:
        k = int(l0.max().item()) if l0.numel() else 0
    values, indices = acts.detach().topk(max(k, 1), dim=-1)
    inactive = values <= 0
    return indices.masked_fill(inactive, 0), values.masked_fill(inactive, 0)


def sae_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: float,
    compute_dtype: torch.dtype | None = None,
) -> Forward:
    """The JumpReLU SAE forward pass, differentiable w.r.t. every parameter (and x).

    Args:
        x: [B, D] activations.
        W_enc: [D, F]; b_enc: [F]; W_dec: [F, D]; b_dec: [D] (also the pre-encoder bias).
        threshold: [F] thresholds (> 0; checked, see kernels/validate.py).
        bandwidth: STE window width eps (finite, > 0).
        compute_dtype: round the products' operands to it (module docstring: bf16 products, accumulation and
            gradients in the parameters' dtype); None: compute in the inputs' dtypes.
    """
    check_sae_inputs(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth)
    check_compute_dtype(compute_dtype)
    acts, l0 = encode(x, W_enc, b_enc, b_dec, threshold, bandwidth, compute_dtype)
    x_hat = decode(acts, W_dec, b_dec, compute_dtype)
    k = None
    if threshold.device.type != "cpu":  # check theta in the transfer that reads K anyway (CPU: already checked)
        max_l0 = l0.detach().max() if l0.numel() else l0.new_zeros(())
        k, bad = torch.stack([max_l0.to(torch.int64), bad_threshold_count(threshold)]).tolist()
        check_threshold_values(threshold, bad)
    indices, values = active_set(acts, l0, k)
    return Forward(x_hat, l0, indices, values)


def decode_sparse(indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Reconstruct x_hat [B, D] from the compact active set: sum_k values[b, k] * W_dec[indices[b, k]] + b_dec.

    Twin of the sparse top-k decode kernel; gathers K rows of W_dec per token instead of an [B, F] product.
    """
    return torch.einsum("bk,bkd->bd", values, W_dec[indices]) + b_dec
