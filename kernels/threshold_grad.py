"""Threshold STE backward from the window pairs only, one program per latent, no atomics.

A pair (b, j) is in the window when |z - theta_j| < eps / 2 (the rectangle kernel is 1 there). Both sparsity
paths of RECIPES.md section 1 give theta_j a gradient only from those pairs:

    JumpReLU path:  dL/df_bj * -(theta_j / eps),  dL/df_bj = dL/dx_hat[b] . W_dec[j]  (active or not)
    L0 path:        dL/dl0_b * -(1 / eps)

so, summed over the batch,

    d theta_j = -(theta_j / eps) * (sum_{b in window_j} dL/dx_hat[b]) . W_dec[j] - (1 / eps) * sum_{b} dL/dl0_b

The program for latent j sums the window rows of dL/dx_hat first and takes one dot product with W_dec[j]:
each window pair costs D adds, each latent 2 * D FLOPs and one read of its decoder row.
With `out_rows` the result is compact: latent i's d theta goes to entry out_rows[i] of a [T] vector.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import launch, tiles
from kernels.latent_grads import LatentMajor


@triton.jit
def _threshold_grad_kernel(
    p_lat,  # [L] latent of each program (those with window pairs)
    p_orow,  # [L] output entry of each program: its latent id, or its rank in a compact output
    p_start,  # [L + 1] pair range of each latent
    p_rows,  # [P] row of each window pair
    p_g,  # [B, D] dL/dx_hat
    p_gl0,  # [B] dL/dl0
    p_wdec,  # [F, D] decoder
    p_theta,  # [F] thresholds
    p_out,  # [F] out (zeros in): d theta ([T] in compact mode)
    D,
    eps,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_l = tl.program_id(0).to(tl.int64)
    j = tl.load(p_lat + i_l)
    start = tl.load(p_start + i_l)
    end = tl.load(p_start + i_l + 1)
    b_dot = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_gsum = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        for p0 in range(start, end, BLOCK_P):
            o_p = p0 + tl.arange(0, BLOCK_P)
            m_p = o_p < end
            b_row = tl.load(p_rows + o_p, mask=m_p, other=0)
            p_grow = p_g + b_row[:, None] * D + o_d[None, :]
            b_gsum += tl.load(p_grow, mask=m_p[:, None] & m_d[None, :], other=0).to(tl.float32)
        b_w = tl.load(p_wdec + j * D + o_d, mask=m_d, other=0).to(tl.float32)
        b_dot += tl.sum(b_gsum, axis=0) * b_w
    b_l0 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)
        m_p = o_p < end
        b_row = tl.load(p_rows + o_p, mask=m_p, other=0)
        b_l0 += tl.load(p_gl0 + b_row, mask=m_p, other=0).to(tl.float32)
    theta = tl.load(p_theta + j).to(tl.float32)
    o_out = tl.load(p_orow + i_l)
    tl.store(p_out + o_out, -(theta / eps) * tl.sum(b_dot, axis=0) - tl.sum(b_l0, axis=0) / eps)


def threshold_grad(
    window: LatentMajor,
    g: Tensor,
    g_l0: Tensor,
    W_dec: Tensor,
    threshold: Tensor,
    bandwidth: float,
    blocks: tuple[int, int] | tiles.Tile | None = None,
    out_rows: Tensor | None = None,
    num_out: int | None = None,
) -> Tensor:
    """d theta [F] (threshold's dtype) from the window pairs; g [B, D] = dL/dx_hat, g_l0 [B] = dL/dl0.

    Compact mode: with out_rows [L] int64 (distinct, in [0, num_out)), window.latents[i]'s gradient goes to
    entry out_rows[i] of a [num_out] result; entries no latent maps to are zero.
    """
    launch.check_kernel_tensors(g=g, g_l0=g_l0, W_dec=W_dec, threshold=threshold)
    tile = tiles.as_tile(blocks, tiles.PAIRS)
    block_p, block_d = tile.blocks
    L = window.latents.numel()
    if out_rows is None:
        out, out_rows = torch.zeros_like(threshold), window.latents
    elif out_rows.shape != window.latents.shape or num_out is None:
        raise ValueError(
            f"compact mode needs num_out and one out_rows entry per latent {tuple(window.latents.shape)};"
            f" got out_rows {tuple(out_rows.shape)}, num_out {num_out}"
        )
    else:
        out = torch.zeros(num_out, dtype=threshold.dtype, device=threshold.device)
    if L:
        _threshold_grad_kernel[(L,)](
            p_lat=window.latents, p_orow=out_rows, p_start=window.starts, p_rows=window.rows, p_g=g, p_gl0=g_l0,
            p_wdec=W_dec, p_theta=threshold, p_out=out, D=W_dec.shape[1], eps=float(bandwidth),
            BLOCK_P=block_p, BLOCK_D=block_d, num_warps=tile.num_warps, num_stages=tile.num_stages,
        )  # fmt: skip
    return out


def flops_and_bytes(B: int, D: int, F: int, W: int) -> tuple[int, int]:
    """W: mean window pairs per row. Reads one fp32 g row per window pair and one decoder row per latent."""
    pairs = B * W
    latents = min(F, pairs)
    return pairs * D + 2 * latents * D, pairs * D * 4 + latents * D * 4 + pairs * 16 + F * 8
