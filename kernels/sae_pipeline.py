"""The JumpReLU SAE step on Triton kernels as two plain functions, `sae_fwd` and `sae_bwd`, written once.

Both callers compose them: `kernels.sae_step` (an autograd Function, dense gradients, dL/dx when asked) and
`kernels.sparse_grads` (no autograd, compact gradients over the touched latents). Neither function checks its
inputs: the public functions that call them validate once (`checked_operands`) and these trust them.

Forward (`sae_fwd`): the fused encode (`jumprelu_encode`) writes each row's active pairs and STE-window pairs in
compact form; each row is then sorted by value (torch, [B, K]) and decoded by gathering K decoder rows
(`sparse_decode`). No [B, F] tensor is ever written. Backward (`sae_bwd`), from the compact lists only, given
g = dL/dx_hat [B, D] and dL/dl0 [B]:

    dz[b, k]          = g[b] . W_dec[indices[b, k]]                  (`gather_dot`; d f / d z = 1 there)
    W_dec, W_enc, b_enc                                             (`latent_grads`, latent-major)
    threshold         from the window pairs, both sparsity paths    (`threshold_grad`)
    x                 sum_k dz[b, k] * W_enc[:, indices[b, k]]       (`decode_rows` on W_enc^T), if asked
    b_dec             sum_b g[b] - sum_b dL/dx[b]                    (pre-encoder bias); without dL/dx,
                      sum_b dL/dx[b] = W_enc @ d b_enc over the fired columns only ([D, L] gather)

Dense gradients are [D, F] / [F, D] / [F], written at the fired (window) latents and zero elsewhere. Compact
ones are indexed by `touched` [T] int64 ascending, every latent that fired or had a window pair (every latent
with a non-zero gradient): latent j's gradients go to row rank(j in touched) through the kernels' `out_rows`.

Mixed precision: x, W_enc and W_dec enter the products as `Operands` (compute_dtype copies, or the tensors
themselves); biases and thresholds stay in their dtype, every sum is fp32, and the weight gradients come in the
master parameters' dtypes (`GradDtypes`).

Everything after the encode is deterministic (no atomics; the encode's atomics only fix slot order, which the
per-row sort and the latent-major sort remove).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kernels import jumprelu_encode as enc
from kernels import latent_grads as lg
from kernels import launch
from kernels import sparse_decode as dec
from kernels import threshold_grad as tg
from kernels.validate import check_compute_dtype, check_sae_inputs, rounds_to


class Blocks(NamedTuple):
    """Tile sizes (powers of two) overriding `kernels.tiles`' table (None: the table's config, with its warps and
    stages); the CPU tests pass small ones."""

    encode: tuple[int, int, int] | None = None  # (rows, latents, d_in) of an encode tile
    rows: tuple[int, int] | None = None  # (slots, d_in) of a decode / gather-dot program
    pairs: tuple[int, int] | None = None  # (pairs, d_in) of a latent-major gradient program


class Operands(NamedTuple):
    """The products' operands: x, W_enc, W_dec in compute_dtype (the inputs themselves when not rounded)."""

    x: Tensor  # [B, D]
    W_enc: Tensor  # [D, F]
    W_dec: Tensor  # [F, D]


def checked_operands(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: float,
    compute_dtype: torch.dtype | None,
    kept: tuple[Tensor, Tensor] | None = None,
) -> Operands:
    """Every check of a public kernel step's inputs, once per call, and the products' operands.

    Checks shapes, dtypes, devices and the bandwidth (`check_sae_inputs`), compute_dtype, the caller's kept
    (W_enc, W_dec) copies if any (the masters' shapes and device, the dtype compute_dtype gives them), and that the
    operands the kernels read are contiguous and on a device they can run on. The operands: detached contiguous
    compute_dtype copies where `kernels.validate.rounds_to` says so (B * D + 2 * D * F elements read and written
    once), else the tensors themselves; with `kept`, x alone is cast here.
    """
    check_sae_inputs(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth)
    check_compute_dtype(compute_dtype)
    if kept is None:
        ops = Operands(*(launch.cast_operand(t, compute_dtype) for t in (x, W_enc, W_dec)))
    else:
        for name, copy, master in (("W_enc", kept[0], W_enc), ("W_dec", kept[1], W_dec)):
            dtype = compute_dtype if rounds_to(master.dtype, compute_dtype) else master.dtype
            if copy.shape != master.shape or copy.dtype != dtype or copy.device != master.device:
                raise ValueError(
                    f"operands: the {name} copy is {copy.dtype} {tuple(copy.shape)} on {copy.device}; compute_dtype "
                    f"{compute_dtype} needs {dtype} {tuple(master.shape)} on {master.device}"
                )
        ops = Operands(launch.cast_operand(x, compute_dtype), *kept)
    launch.check_kernel_tensors(x=ops.x, W_enc=ops.W_enc, b_enc=b_enc, W_dec=ops.W_dec, b_dec=b_dec,
                                threshold=threshold)  # fmt: skip
    return ops


class Active(NamedTuple):
    """What the forward leaves for the backward: the encode's compact lists and the rows' sorted active sets."""

    code: enc.SparseCode  # counts, window pairs, fire counts, capacity, reruns
    indices: Tensor  # [B, K] int64, each row's active latents by descending value, padded with 0
    values: Tensor  # [B, K] fp32 matching values, padded with 0


class GradDtypes(NamedTuple):
    """The weight gradients' dtypes: the master parameters' (the operands may be 16-bit copies)."""

    W_enc: torch.dtype
    b_enc: torch.dtype
    W_dec: torch.dtype


class Grads(NamedTuple):
    """Result of `sae_bwd`: dense, or with `compact` over the T touched latents (shapes in brackets)."""

    W_enc: Tensor  # [D, F]  ([D, T])
    b_enc: Tensor  # [F]  ([T])
    W_dec: Tensor  # [F, D]  ([T, D])
    b_dec: Tensor  # [D] in b_dec's dtype
    threshold: Tensor  # [F]  ([T]) in threshold's dtype
    x: Tensor | None  # [B, D] fp32 dL/dx when asked (`grad_x`)
    touched: Tensor | None  # [T] int64 ascending with `compact`


def _sort_rows(idx: Tensor, val: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """[B, K] int64 indices and fp32 values, K = max(max L0, 1), each row by descending value, (0, 0) padded."""
    K = max(int(counts.max()) if counts.numel() else 0, 1)
    used = torch.arange(K, device=idx.device)[None, :] < counts[:, None]
    values, order = torch.where(used, val[:, :K], -torch.inf).sort(dim=1, descending=True, stable=True)
    indices = torch.where(used, idx[:, :K].gather(1, order).long(), 0)  # used slots stay first after sorting
    return indices, torch.where(used, values, 0.0)


def sae_fwd(
    ops: Operands,
    b_enc: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: float,
    x_hat_dtype: torch.dtype,
    capacity: int | None,
    window_capacity: int | None,
    blocks: Blocks,
) -> tuple[Tensor, Active]:
    """The encode, each row's active set sorted by value, and the decode: (x_hat [B, D] in x_hat_dtype, Active).

    capacity, window_capacity: slots per row to try first (`kernels.jumprelu_encode.jumprelu_encode`).
    """
    code = enc.jumprelu_encode(ops.x, ops.W_enc, b_enc, b_dec, threshold, bandwidth, capacity, window_capacity,
                               blocks.encode)  # fmt: skip
    indices, values = _sort_rows(code.indices, code.values, code.counts)
    x_hat = dec.decode_rows(indices, values, code.counts, ops.W_dec, b_dec, x_hat_dtype, blocks.rows)
    return x_hat, Active(code, indices, values)


def sae_bwd(
    ops: Operands,
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: float,
    active: Active,
    g: Tensor,
    g_l0: Tensor,
    dtypes: GradDtypes,
    blocks: Blocks,
    *,
    compact: bool = False,
    grad_x: bool = False,
) -> Grads:
    """Every gradient of the step from the forward's compact lists (module docstring).

    g: [B, D] dL/dx_hat, contiguous; g_l0: [B] fp32 dL/dl0, contiguous.
    compact: gradients over `touched` only (no [F, D] tensor); else dense. grad_x: also dL/dx (fp32).
    """
    code, indices, values = active
    D, F = ops.W_enc.shape
    dz = dec.gather_dot(g, ops.W_dec, indices, code.counts, blocks.rows)
    fired = lg.latent_major(indices, code.counts, F, code.fire_counts)
    window = lg.latent_major(code.window, code.window_counts, F)
    if compact:
        touched = torch.unique(torch.cat([fired.latents, window.latents]))  # sorted, distinct
        rows_fired = torch.searchsorted(touched, fired.latents)
        rows_window = torch.searchsorted(touched, window.latents)
        n_out = touched.numel()
    else:
        touched, rows_fired, rows_window, n_out = None, fired.latents, window.latents, F

    encoder = lg.EncoderPairs(dz, ops.x, b_dec, dtypes.W_enc, dtypes.b_enc, launch.operand_dtype(ops.x, ops.W_enc))
    weights = lg.latent_grads(fired, values, g, (n_out, D), dtypes.W_dec, encoder, blocks.pairs, out_rows=rows_fired)
    d_theta = tg.threshold_grad(window, g, g_l0, ops.W_dec, threshold, bandwidth, blocks.pairs, rows_window, n_out)

    d_x = None
    if grad_x:
        d_x = dec.decode_rows(indices, dz, code.counts, ops.W_enc.t(), None, torch.float32, blocks.rows)
        through_encoder = d_x.sum(0)
    else:
        fired_W_enc = ops.W_enc.index_select(1, fired.latents).float()
        through_encoder = fired_W_enc @ weights.b_enc[rows_fired].float()
    d_b_dec = g.sum(0, dtype=torch.float32) - through_encoder
    return Grads(weights.W_enc, weights.b_enc, weights.W_dec, d_b_dec.to(b_dec.dtype), d_theta, d_x, touched)
