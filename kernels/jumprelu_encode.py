"""Fused JumpReLU encode: z = (x - b_dec) @ W_enc + b_enc with the threshold in the epilogue, compact output.

The dense version (`kernels.reference.encode`) writes z and f, each [B, F], then reads them back. Here each
program computes one [BLOCK_B, BLOCK_F] tile of z on chip and writes only:

    indices [B, CAP] int32, values [B, CAP] fp32   active pairs z > theta, per row, in arrival order
    window  [B, WCAP] int32                        pairs inside the STE window |z - theta| < eps / 2
    counts [B], window_counts [B] int32            the rows' true counts (> CAP means overflow)
    fire_counts [F] int32                          per-latent number of rows where the latent fired

A tile appends a row's segment with one atomic per (tile, row) that reserves its slots, then places pairs
by a prefix sum inside the tile. Counters always hold the true count, so a row that overflows the
capacity is detected and the launcher re-runs once with the exact capacity: nothing is truncated.
The window's z is not stored: the rectangle kernel is constant inside the window, so the threshold
gradient needs only which pairs are there.

Cost (`flops_and_bytes`): 2 * B * D * F FLOPs, the whole step's dominant term; HBM traffic is one read of
W_enc (D * F * 2 bytes in bf16: 4.8 GB at D = 2304, F = 2^20), x re-read once per latent tile (L2-resident),
and about 8 bytes per active pair written. The dense encode would also write z and f: 2 * B * F * 4 bytes
(32 GiB at B = 4096, F = 2^20). fp32 operands use exact fp32 products (`input_precision="ieee"`, no tensor
cores); 16-bit x and W_enc use tensor cores with fp32 accumulation, and x - b_dec (computed in fp32) is
rounded to their dtype, as `kernels.reference` with `compute_dtype` rounds it. Under Triton's interpreter the
product runs in fp32 on those rounded values (exact products, fp32 sums: the same numbers up to order).

Every call also checks theta > 0 (kernels/validate.py) in the transfer that reads the counts back.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import launch, tiles
from kernels.validate import bad_threshold_count, check_threshold_values


class SparseCode(NamedTuple):
    """Result of `jumprelu_encode`. Slots of row b past counts[b] (resp. window_counts[b]) are undefined."""

    indices: Tensor  # [B, capacity] int32 active latents of each row, unordered
    values: Tensor  # [B, capacity] fp32 their pre-activations z (> theta)
    counts: Tensor  # [B] int32 L0 of each row
    window: Tensor  # [B, window_capacity] int32 latents with |z - theta| < eps / 2, unordered
    window_counts: Tensor  # [B] int32
    fire_counts: Tensor  # [F] int32 rows in which each latent fired
    capacity: int  # slots per row used by the final run (>= max L0)
    window_capacity: int
    reruns: int  # 1 when the first run's capacity overflowed and the encode ran again, else 0


@triton.jit
def _jumprelu_encode_kernel(
    p_x,  # [B, D] activations
    p_w,  # [D, F] encoder weight
    p_benc,  # [F] encoder bias
    p_bdec,  # [D] decoder bias, subtracted from x first
    p_theta,  # [F] thresholds
    p_idx,  # [B, CAP] int32 out: active latents, appended per row
    p_val,  # [B, CAP] fp32 out: their z
    p_cnt,  # [B] int32 in (zeros) / out: active count per row
    p_win,  # [B, WCAP] int32 out: window latents, appended per row
    p_wcnt,  # [B] int32 in (zeros) / out: window count per row
    p_fire,  # [F] int32 in (zeros) / out: per-latent fire count
    B,
    D,
    F,
    CAP,
    WCAP,
    eps,  # STE bandwidth
    OP_DTYPE: tl.constexpr,  # operand type of the product: bf16/fp16 (x - b_dec is rounded to it) or fp32
    DOT_DTYPE: tl.constexpr,  # tl.dot operand type: OP_DTYPE, or fp32 under the interpreter
    PRECISION: tl.constexpr,  # "ieee" for exact fp32 products
    BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_f = tl.program_id(1).to(tl.int64)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_f = i_f * BLOCK_F + tl.arange(0, BLOCK_F)
    m_b = o_b < B
    m_f = o_f < F

    b_z = tl.zeros([BLOCK_B, BLOCK_F], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        # int64 before any stride: o_d * F reaches D * F, past 2^31 at F = 2^20 from d = 2048.
        o_d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        m_d = o_d < D
        # Masked lanes load 0 on both sides, so (x - b_dec) is 0 there and adds nothing to the product.
        b_x = tl.load(p_x + o_b[:, None] * D + o_d[None, :], mask=m_b[:, None] & m_d[None, :], other=0)
        b_bdec = tl.load(p_bdec + o_d, mask=m_d, other=0)
        b_xc = (b_x.to(tl.float32) - b_bdec.to(tl.float32)[None, :]).to(OP_DTYPE)
        b_w = tl.load(p_w + o_d[:, None] * F + o_f[None, :], mask=m_d[:, None] & m_f[None, :], other=0)
        b_z += tl.dot(b_xc.to(DOT_DTYPE), b_w.to(DOT_DTYPE), input_precision=PRECISION)

    b_theta = tl.load(p_theta + o_f, mask=m_f, other=0).to(tl.float32)
    b_z += tl.load(p_benc + o_f, mask=m_f, other=0).to(tl.float32)[None, :]
    m_valid = m_b[:, None] & m_f[None, :]
    m_act = m_valid & (b_z > b_theta[None, :])
    b_u = (b_z - b_theta[None, :]) / eps  # same expression as the reference's rectangle kernel
    m_win = m_valid & (b_u > -0.5) & (b_u < 0.5)
    b_fire = tl.sum(m_act.to(tl.int32), axis=0)
    tl.atomic_add(p_fire + o_f, b_fire, mask=m_f & (b_fire > 0), sem="relaxed")

    # Both lists' per-row positions from one inclusive prefix sum: an active pair adds 1, a window pair 512; a
    # row holds at most BLOCK_F < 512 pairs of either kind in a tile, so the two counts never carry.
    tl.static_assert(BLOCK_F < 512)
    b_one = tl.where(m_act, 1, 0) + tl.where(m_win, 512, 0)
    if OP_DTYPE == tl.float32:
        b_pos = tl.cumsum(b_one, axis=1)
    else:
        # With tensor cores, as a product with an upper-triangular matrix of ones: the sum stays in the
        # accumulator's layout beside b_z, where a tl.cumsum spilled 0.3-1.2 KB per thread more at the same tiles
        # (docs/performance.md section 3; with fp32 operands the cumsum spills less). The addends (0, 1, 512, 513)
        # are exact in fp16 and every partial sum (<= 513 * BLOCK_F) exact in fp32.
        o_c = tl.arange(0, BLOCK_F)
        b_tri = tl.where(o_c[:, None] <= o_c[None, :], 1.0, 0.0).to(tl.float16)
        b_pos = tl.dot(b_one.to(tl.float16), b_tri, out_dtype=tl.float32).to(tl.int32)
    b_n = tl.sum(b_one, axis=1)
    b_nact = b_n & 511
    b_nwin = b_n >> 9
    b_base = tl.atomic_add(p_cnt + o_b, b_nact, mask=m_b & (b_nact > 0), sem="relaxed")
    b_wbase = tl.atomic_add(p_wcnt + o_b, b_nwin, mask=m_b & (b_nwin > 0), sem="relaxed")
    b_lat = o_f.to(tl.int32)[None, :]
    # Active pairs: this tile's slots in each row were reserved by the atomic; place them by the prefix sum.
    b_slot = b_base[:, None] + (b_pos & 511) - 1
    m_put = m_act & (b_slot < CAP)
    tl.store(p_idx + o_b[:, None] * CAP + b_slot, b_lat, mask=m_put)
    tl.store(p_val + o_b[:, None] * CAP + b_slot, b_z, mask=m_put)
    # Window pairs, the same way.
    b_wslot = b_wbase[:, None] + (b_pos >> 9) - 1
    tl.store(p_win + o_b[:, None] * WCAP + b_wslot, b_lat, mask=m_win & (b_wslot < WCAP))


def _launch(x, W_enc, b_enc, b_dec, threshold, bandwidth, cap, wcap, tile: tiles.Tile):
    (B, D), F = x.shape, W_enc.shape[1]
    block_b, block_f, block_d = tile.blocks
    dev = x.device
    idx = launch.empty((B, cap), torch.int32, dev)
    val = launch.empty((B, cap), torch.float32, dev)
    win = launch.empty((B, wcap), torch.int32, dev)
    cnt = torch.zeros(B, dtype=torch.int32, device=dev)
    wcnt = torch.zeros(B, dtype=torch.int32, device=dev)
    fire = torch.zeros(F, dtype=torch.int32, device=dev)
    op = launch.dot_dtype(x, W_enc)
    dot = tl.float32 if launch.interpreting() else op  # interpreter: fp32 products of the rounded values
    grid = (triton.cdiv(B, block_b), triton.cdiv(F, block_f))
    _jumprelu_encode_kernel[grid](
        p_x=x, p_w=W_enc, p_benc=b_enc, p_bdec=b_dec, p_theta=threshold,
        p_idx=idx, p_val=val, p_cnt=cnt, p_win=win, p_wcnt=wcnt, p_fire=fire,
        B=B, D=D, F=F, CAP=cap, WCAP=wcap, eps=float(bandwidth),
        OP_DTYPE=op, DOT_DTYPE=dot, PRECISION="ieee" if dot == tl.float32 else "tf32",
        BLOCK_B=block_b, BLOCK_F=block_f, BLOCK_D=block_d, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    return idx, val, cnt, win, wcnt, fire


def jumprelu_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: float,
    capacity: int | None = None,
    window_capacity: int | None = None,
    blocks: tuple[int, int, int] | tiles.Tile | None = None,
) -> SparseCode:
    """Active set and STE-window pairs of every row of x [B, D], never materialising [B, F].

    Args:
        capacity, window_capacity: slots per row to try first (default min(F, 128)); a row with more pairs
            makes the encode run again with exactly enough slots, reported as `reruns`.
        blocks: (BLOCK_B, BLOCK_F, BLOCK_D), powers of two (>= 16 for tl.dot), BLOCK_F <= 256, or a `tiles.Tile`;
            default `kernels.tiles.encode_tile` of the operand dtype.
    Inputs must be contiguous and already checked by `kernels.validate.check_sae_inputs`; theta > 0 is
    checked here, read back with the counts (ValueError otherwise).
    """
    launch.check_kernel_tensors(x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec, threshold=threshold)
    F = W_enc.shape[1]
    cap = max(1, min(F, 128) if capacity is None else capacity)
    wcap = max(1, min(F, 128) if window_capacity is None else window_capacity)
    tile = tiles.as_tile(blocks, tiles.encode_tile(launch.operand_dtype(x, W_enc)))
    bad = bad_threshold_count(threshold)
    for reruns in range(2):
        idx, val, cnt, win, wcnt, fire = _launch(x, W_enc, b_enc, b_dec, threshold, bandwidth, cap, wcap, tile)
        read = [bad] + ([cnt.max().long(), wcnt.max().long()] if cnt.numel() else [])
        n_bad, need, wneed = (torch.stack(read).tolist() + [0, 0])[:3]  # one synchronisation
        check_threshold_values(threshold, n_bad)
        if need <= cap and wneed <= wcap:
            return SparseCode(idx, val, cnt, win, wcnt, fire, cap, wcap, reruns)
        cap, wcap = max(cap, need), max(wcap, wneed)
    raise RuntimeError(f"encode overflowed twice (capacity {cap}, window {wcap}): counts are not deterministic")


def flops_and_bytes(B: int, D: int, F: int, K: int, W: int = 0, elt: int = 2) -> tuple[int, int]:
    """Useful FLOPs and minimum HBM bytes of one encode: the [B, D] x [D, F] product plus its compact output.

    K: mean L0 per row; W: mean window pairs per row; elt: bytes per x / W_enc element (2 for bf16).
    Reads x, W_enc, b_enc, theta (fp32), writes (index, value) per active pair and an index per window pair.
    """
    flops = 2 * B * D * F
    nbytes = (B * D + D * F) * elt + 2 * F * 4 + B * K * 8 + B * W * 4 + (2 * B + F) * 4
    return flops, nbytes
