"""Sparse top-k decode: x_hat = sum_k values[b, k] * W_dec[indices[b, k]] + b_dec, forward and backward.

The dense decode (`kernels.reference.decode`) is an [B, F] x [F, D] product; here each token gathers its K
decoder rows, 2 * B * K * D FLOPs instead of 2 * B * F * D. Backward:

    d values[b, k] = dL/dx_hat[b] . W_dec[indices[b, k]]      one dot product per pair (`gather_dot`)
    d W_dec[j]     = sum over pairs (b, k) with indices[b, k] = j of values[b, k] * dL/dx_hat[b]
                     accumulated latent-major into the rows that fired only (`kernels.latent_grads`)
    d b_dec        = sum_b dL/dx_hat[b]

The backward uses no atomics, so it is deterministic: every output element is summed by one program in
a fixed order (pairs sorted by latent, then row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import launch, tiles
from kernels.latent_grads import latent_grads, latent_major


@triton.jit
def _sparse_decode_kernel(
    p_idx,  # [B, K] latent of each slot (int32 or int64)
    p_val,  # [B, K] coefficient of each slot
    p_cnt,  # [B] int32 slots used per row; slots past it are skipped
    p_w,  # [F, D] rows to combine; element (f, d) at f * stride_wf + d * stride_wd
    p_bias,  # [D] added to every output row (read only if HAS_BIAS)
    p_out,  # [B, D] out
    K,
    D,
    stride_wf,
    stride_wd,
    HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    n = tl.load(p_cnt + i_b)
    b_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < n
        b_idx = tl.load(p_idx + i_b * K + o_k, mask=m_k, other=0).to(tl.int64)
        b_val = tl.load(p_val + i_b * K + o_k, mask=m_k, other=0).to(tl.float32)
        p_rows = p_w + b_idx[:, None] * stride_wf + o_d[None, :] * stride_wd
        b_w = tl.load(p_rows, mask=m_k[:, None] & m_d[None, :], other=0).to(tl.float32)
        b_acc += tl.sum(b_val[:, None] * b_w, axis=0)
    if HAS_BIAS:
        b_acc += tl.load(p_bias + o_d, mask=m_d, other=0).to(tl.float32)
    tl.store(p_out + i_b * D + o_d, b_acc, mask=m_d)


@triton.jit
def _gather_dot_kernel(
    p_g,  # [B, D] one vector per row (dL/dx_hat)
    p_w,  # [F, D] rows gathered by the slots
    p_idx,  # [B, K] latent of each slot
    p_cnt,  # [B] int32 slots used per row
    p_out,  # [B, K] fp32 out: g[b] . W[idx[b, k]] for k < cnt[b], else 0
    K,
    D,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1).to(tl.int64)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_use = o_k < tl.load(p_cnt + i_b)
    b_idx = tl.load(p_idx + i_b * K + o_k, mask=m_use, other=0).to(tl.int64)
    b_acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_g = tl.load(p_g + i_b * D + o_d, mask=m_d, other=0).to(tl.float32)
        b_w = tl.load(p_w + b_idx[:, None] * D + o_d[None, :], mask=m_use[:, None] & m_d[None, :], other=0)
        b_acc += b_w.to(tl.float32) * b_g[None, :]
    tl.store(p_out + i_b * K + o_k, tl.sum(b_acc, axis=1), mask=o_k < K)


def decode_rows(
    indices: Tensor,
    values: Tensor,
    counts: Tensor,
    W: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    blocks: tuple[int, int] | tiles.Tile | None = None,
) -> Tensor:
    """out [B, D] = sum over k < counts[b] of values[b, k] * W[indices[b, k]] (+ bias). W may be strided."""
    launch.check_kernel_tensors(indices=indices, values=values, counts=counts)
    if W.device != indices.device:
        raise ValueError(f"W is on {W.device} but indices are on {indices.device}")
    (B, K), D = indices.shape, W.shape[1]
    tile = tiles.as_tile(blocks, tiles.ROWS)
    block_k, block_d = tile.blocks
    out = launch.empty((B, D), out_dtype, indices.device)
    _sparse_decode_kernel[(B, triton.cdiv(D, block_d))](
        p_idx=indices, p_val=values, p_cnt=counts, p_w=W, p_bias=bias if bias is not None else W, p_out=out,
        K=K, D=D, stride_wf=W.stride(0), stride_wd=W.stride(1),
        HAS_BIAS=bias is not None, BLOCK_K=block_k, BLOCK_D=block_d,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    return out


def gather_dot(
    g: Tensor, W: Tensor, indices: Tensor, counts: Tensor, blocks: tuple[int, int] | tiles.Tile | None = None
) -> Tensor:
    """[B, K] fp32: g[b] . W[indices[b, k]] for the used slots k < counts[b], 0 past them."""
    launch.check_kernel_tensors(g=g, W=W, indices=indices, counts=counts)
    (B, K), D = indices.shape, W.shape[1]
    tile = tiles.as_tile(blocks, tiles.ROWS)
    block_k, block_d = tile.blocks
    out = launch.empty((B, K), torch.float32, g.device)
    _gather_dot_kernel[(B, triton.cdiv(K, block_k))](
        p_g=g, p_w=W, p_idx=indices, p_cnt=counts, p_out=out, K=K, D=D, BLOCK_K=block_k, BLOCK_D=block_d,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    return out


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
        counts = torch.full((indices.shape[0],), indices.shape[1], dtype=torch.int32, device=indices.device)
        ctx.save_for_backward(indices, values, counts, W_dec)
        ctx.b_dec_dtype = b_dec.dtype
        return decode_rows(indices, values, counts, W_dec, b_dec, values.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        indices, values, counts, W_dec = ctx.saved_tensors
        g = g.contiguous()
        d_values = gather_dot(g, W_dec, indices, counts).to(values.dtype)
        pairs = latent_major(indices, counts, W_dec.shape[0])
        d_W_dec = latent_grads(pairs, values, g, W_dec.shape, W_dec.dtype).W_dec
        return None, d_values, d_W_dec, g.sum(0).to(ctx.b_dec_dtype)


def decode_sparse(indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Kernel twin of `kernels.reference.decode_sparse`: x_hat [B, D] from the compact active set.

    Args:
        indices: [B, K] latent ids (int32 / int64); values: [B, K]; W_dec: [F, D]; b_dec: [D].
    Differentiable w.r.t. values, W_dec and b_dec. Every slot counts, including (0, 0) padding.
    """
    if indices.dim() != 2 or values.shape != indices.shape:
        raise ValueError(f"indices and values must both be [B, K]; got {tuple(indices.shape)}, {tuple(values.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64; got {indices.dtype}")
    if W_dec.dim() != 2 or b_dec.shape != (W_dec.shape[1],):
        raise ValueError(f"W_dec must be [F, D] and b_dec [D]; got {tuple(W_dec.shape)}, {tuple(b_dec.shape)}")
    launch.check_kernel_tensors(indices=indices, values=values, W_dec=W_dec, b_dec=b_dec)
    return _SparseDecode.apply(indices, values, W_dec, b_dec)


def flops_and_bytes(B: int, D: int, F: int, K: int, elt: int = 2) -> tuple[int, int]:
    """Forward decode plus its backward (values gradient, decoder gradient), counting useful work only.

    Decode and gather-dot each read K decoder rows per token (B * K * D * elt) and do 2 * B * K * D FLOPs;
    the decoder gradient reads one fp32 dL/dx_hat row per pair and writes each fired row once (<= F * D * 4).
    """
    pairs = B * K
    flops = 3 * 2 * pairs * D
    nbytes = 2 * pairs * D * elt + pairs * D * 4 + min(F, pairs) * D * 4 + 3 * B * D * 4 + 3 * pairs * 8
    return flops, nbytes
