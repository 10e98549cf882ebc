"""Weight gradients of the sparse SAE from its active pairs, latent-major, deterministic and atomic-free.

With P active (row, latent) pairs (P = B * L0), f the active value and dz = dL/dz of each pair:

    d W_dec[j]     = sum_{pairs (b, j)} f_bj  * dL/dx_hat[b]          rows of W_dec that fired
    d W_enc[:, j]  = sum_{pairs (b, j)} dz_bj * (x[b] - b_dec)         columns of W_enc that fired
                     (x[b] - b_dec rounded to the encode's 16-bit operand dtype, if any: the gradient is
                     taken at the operand the product saw, as `kernels.reference` with `compute_dtype`)
    d b_enc[j]     = sum_{pairs (b, j)} dz_bj

A counting sort (`latent_major`: torch sort/bincount on the [P] pair list) gives each latent its pairs in
row order; one program owns one (latent, BLOCK_D slice), so every gradient element is written once, in a
fixed order, with no atomics. Latents that never fired keep their zero gradient untouched.

Compact mode (`out_rows`): latent i's gradients go to row out_rows[i] of [T, D] / [D, T] / [T] outputs
instead of row latents[i] of [F, D] / [D, F] / [F] ones, so a sparse training step never allocates a dense
weight gradient. The kernel reads nothing indexed by latent, so only the store address changes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import launch, tiles


class LatentMajor(NamedTuple):
    """Pairs of a row-major [B, K] slot list regrouped by latent (a CSR matrix over latents)."""

    latents: Tensor  # [L] int64 latents with at least one pair, ascending
    starts: Tensor  # [L + 1] int64 pairs of latents[i] are positions starts[i]:starts[i + 1]
    rows: Tensor  # [P] int64 token row of each pair, ascending within a latent
    slots: Tensor  # [P] int64 flat slot b * K + k of each pair in the row-major list


class EncoderPairs(NamedTuple):
    """What the encoder gradients need besides the pairs; the gradients come in the given dtypes."""

    dz: Tensor  # [B, K] fp32 dL/dz of each slot
    x: Tensor  # [B, D] the encode's x operand
    b_dec: Tensor  # [D] pre-encoder bias
    W_enc_dtype: torch.dtype  # of the gradient (the master weight's dtype)
    b_enc_dtype: torch.dtype
    operand_dtype: torch.dtype = torch.float32  # the encode's product operands (`launch.operand_dtype`)


class WeightGrads(NamedTuple):
    """Dense, or with `out_rows` compact over T latents (shapes in brackets)."""

    W_dec: Tensor  # [F, D]  ([T, D])
    W_enc: Tensor | None  # [D, F]  ([D, T])
    b_enc: Tensor | None  # [F]  ([T])


def latent_major(indices: Tensor, counts: Tensor, F: int, per_latent: Tensor | None = None) -> LatentMajor:
    """Regroup the used slots (k < counts[b]) of indices [B, K] by latent; per_latent: [F] pair counts if known."""
    B, K = indices.shape
    used = (torch.arange(K, device=indices.device)[None, :] < counts[:, None]).flatten()
    slots = used.nonzero().squeeze(1)  # row-major, so rows ascend
    latent = indices.flatten()[slots].long()
    latent, order = torch.sort(latent, stable=True)  # stable: rows stay ascending within a latent
    slots = slots[order]
    if per_latent is None:
        per_latent = torch.bincount(latent, minlength=F)
    latents = per_latent.nonzero().squeeze(1)
    starts = torch.zeros(latents.numel() + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(per_latent[latents], 0, out=starts[1:])
    return LatentMajor(latents, starts, torch.div(slots, K, rounding_mode="floor"), slots)


@triton.jit
def _latent_grads_kernel(
    p_lat,  # [L] output row of each program: its latent id, or its rank in a compact output
    p_start,  # [L + 1] pair range of each latent
    p_rows,  # [P] row of each pair
    p_slots,  # [P] flat slot of each pair in the [B, K] lists below
    p_f,  # [B, K] active value of each slot
    p_g,  # [B, D] dL/dx_hat
    p_dwdec,  # [F, D] out (zeros in): rows that fired ([T, D] in compact mode, F = T)
    p_dz,  # [B, K] fp32 dL/dz of each slot (read only if HAS_ENC)
    p_x,  # [B, D] activations
    p_bdec,  # [D] pre-encoder bias
    p_dwenc,  # [D, F] out (zeros in): columns that fired ([D, T] in compact mode)
    p_dbenc,  # [F] out (zeros in) ([T] in compact mode)
    D,
    F,
    HAS_ENC: tl.constexpr,
    XC_DTYPE: tl.constexpr,  # the encode's operand type: x - b_dec is rounded to it, as the encode did
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_l = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    j = tl.load(p_lat + i_l)
    start = tl.load(p_start + i_l)
    end = tl.load(p_start + i_l + 1)
    b_dec = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    b_enc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    b_bias = tl.zeros([BLOCK_P], dtype=tl.float32)
    if HAS_ENC:
        b_bdec = tl.load(p_bdec + o_d, mask=m_d, other=0).to(tl.float32)
    for p0 in range(start, end, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)
        m_p = o_p < end
        b_row = tl.load(p_rows + o_p, mask=m_p, other=0)
        b_slot = tl.load(p_slots + o_p, mask=m_p, other=0)
        m_pd = m_p[:, None] & m_d[None, :]
        b_f = tl.load(p_f + b_slot, mask=m_p, other=0).to(tl.float32)
        b_g = tl.load(p_g + b_row[:, None] * D + o_d[None, :], mask=m_pd, other=0).to(tl.float32)
        b_dec += b_f[:, None] * b_g
        if HAS_ENC:
            b_dz = tl.load(p_dz + b_slot, mask=m_p, other=0)
            b_x = tl.load(p_x + b_row[:, None] * D + o_d[None, :], mask=m_pd, other=0).to(tl.float32)
            b_enc += b_dz[:, None] * (b_x - b_bdec[None, :]).to(XC_DTYPE).to(tl.float32)
            b_bias += b_dz
    tl.store(p_dwdec + j * D + o_d, tl.sum(b_dec, axis=0), mask=m_d)
    if HAS_ENC:
        tl.store(p_dwenc + o_d * F + j, tl.sum(b_enc, axis=0), mask=m_d)  # a strided column of [D, F]
        if i_d == 0:
            tl.store(p_dbenc + j, tl.sum(b_bias, axis=0))


def latent_grads(
    pairs: LatentMajor,
    f: Tensor,
    g: Tensor,
    W_dec_shape: torch.Size,
    dtype: torch.dtype,
    encoder: EncoderPairs | None = None,
    blocks: tuple[int, int] | tiles.Tile | None = None,
    out_rows: Tensor | None = None,
) -> WeightGrads:
    """Decoder (and, given `encoder`, encoder) weight gradients from the latent-major pairs.

    f: [B, K] active value of each slot; g: [B, D] dL/dx_hat. d W_dec is allocated as zeros in `dtype`.
    out_rows: [L] int64, compact mode: pairs.latents[i]'s gradients go to row out_rows[i] (distinct, in
        [0, T)) and W_dec_shape is (T, D): d W_dec [T, D], d W_enc [D, T], d b_enc [T]; rows that no latent
        maps to stay zero. Default: row = latent id, W_dec_shape = (F, D).
    """
    enc = encoder
    launch.check_kernel_tensors(f=f, g=g, **({} if enc is None else {"dz": enc.dz, "x": enc.x, "b_dec": enc.b_dec}))
    F, D = W_dec_shape
    tile = tiles.as_tile(blocks, tiles.PAIRS)
    block_p, block_d = tile.blocks
    dev = g.device
    d_W_dec = torch.zeros((F, D), dtype=dtype, device=dev)
    d_W_enc = d_b_enc = None
    if enc is not None:
        d_W_enc = torch.zeros((D, F), dtype=enc.W_enc_dtype, device=dev)
        d_b_enc = torch.zeros(F, dtype=enc.b_enc_dtype, device=dev)
    L = pairs.latents.numel()
    if out_rows is None:
        out_rows = pairs.latents
    elif out_rows.shape != pairs.latents.shape:
        raise ValueError(
            f"out_rows must have one row per latent, {tuple(pairs.latents.shape)}; got {tuple(out_rows.shape)}"
        )
    if L:
        # Without the encoder the HAS_ENC=False kernel reads none of its pointers: any valid tensor stands in.
        encoder_args = (
            {"p_dz": f, "p_x": g, "p_bdec": g, "p_dwenc": d_W_dec, "p_dbenc": d_W_dec} if enc is None
            else {"p_dz": enc.dz, "p_x": enc.x, "p_bdec": enc.b_dec, "p_dwenc": d_W_enc, "p_dbenc": d_b_enc}
        )  # fmt: skip
        _latent_grads_kernel[(L, triton.cdiv(D, block_d))](
            p_lat=out_rows, p_start=pairs.starts, p_rows=pairs.rows, p_slots=pairs.slots, p_f=f, p_g=g,
            p_dwdec=d_W_dec, **encoder_args, D=D, F=F, HAS_ENC=enc is not None,
            XC_DTYPE=launch.tl_dtype(torch.float32 if enc is None else enc.operand_dtype),
            BLOCK_P=block_p, BLOCK_D=block_d, num_warps=tile.num_warps, num_stages=tile.num_stages,
        )  # fmt: skip
    return WeightGrads(d_W_dec, d_W_enc, d_b_enc)


def flops_and_bytes(B: int, D: int, F: int, K: int) -> tuple[int, int]:
    """Both weight gradients from P = B * K pairs: 4 * P * D FLOPs; reads a g and an x row (fp32) per
    pair, writes each fired decoder row and encoder column once (<= min(F, P) of each, fp32)."""
    pairs = B * K
    return 4 * pairs * D, 2 * pairs * D * 4 + 2 * min(F, pairs) * D * 4 + pairs * 24
