"""One JumpReLU SAE training step's loss and COMPACT gradients, without autograd and without a dense gradient.

`sae_forward_sparse` (kernels/sae_step.py) already avoids every [B, F] tensor, but its autograd backward
returns dense d W_enc [D, F] and d W_dec [F, D] (zero-filled, then written at the fired latents only), and
the optimizer then reads and writes every element of both. Here the same kernels run in compact mode:

    touched  [T] int64 ascending: every latent that fired in the batch or had a pair in the threshold's STE
             window (union), i.e. every latent with a non-zero gradient in any latent parameter
    W_enc    [D, T]  column r = d W_enc[:, touched[r]]     (the layout `sae.sparse_adam.LazyAdam` takes)
    W_dec    [T, D]  row r    = d W_dec[touched[r]]
    b_enc    [T], threshold [T]                           zero for a latent only in the window / only active
    b_dec    [D]     dense

Every gradient of a latent outside `touched` is exactly zero, so with Adam(0, beta2) (`LazyAdam`) the step
touches O(T * D) bytes instead of O(F * D). The loss is the trainer's (sae/objectives.py):

    reconstruction = mean_b sum_d (x_hat - x)^2            dL/dx_hat = 2 (x_hat - x) / B
    "l0":          S = c * m                             dL/dl0_b  = c / B
    "target_l0":   S = c * (m / target - 1)^2             dL/dl0_b  = 2 c (m / target - 1) / (target * B)

with m = mean_b L0; the per-row upstream dL/dl0 is one scalar known once m is. The kernels (see
kernels/sae_step.py for the forward and the backward formulas):

    forward   jumprelu_encode -> per-row sort -> decode_rows                  x_hat, L0, active set, window
    dz        gather_dot(dL/dx_hat, W_dec)                                    [B, K]
    W_dec, W_enc, b_enc  latent_grads(out_rows = rank in touched)             written once per touched row
    threshold threshold_grad(out_rows = rank in touched)                      both sparsity paths
    b_dec     sum_b dL/dx_hat[b] - W_enc[:, fired] @ d b_enc[fired]           pre-encoder bias

Mixed precision (`compute_dtype`): x, W_enc and W_dec enter the products as compute_dtype copies (`operands`
lets the caller pass W_enc and W_dec copies it keeps up to date, see sae/model.py `OperandCache`), the loss is
taken against the un-rounded x, and the compact gradients are allocated in the master parameters' dtypes.

Bytes saved against the dense step (`optimizer_bytes`): the dense path zero-fills two [F, D] gradients,
projects, clips, runs torch's Adam (with a first moment that beta1 = 0 makes redundant) and renormalises over
all 2 * F * D weights; the sparse one gathers, updates and scatters only 2 * T * D.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kernels import latent_grads as lg
from kernels import launch
from kernels import sparse_decode as dec
from kernels import threshold_grad as tg
from kernels.sae_step import Blocks, Operands, cast_operands, encode_sorted
from kernels.validate import check_compute_dtype, check_sae_inputs, rounds_to

SPARSITY_KINDS = ("l0", "target_l0")


class CompactGrads(NamedTuple):
    """Gradients of the touched latents only, in each parameter's dtype (`_asdict()` feeds `LazyAdam.step`)."""

    W_enc: Tensor  # [D, T]
    b_enc: Tensor  # [T]
    W_dec: Tensor  # [T, D]
    b_dec: Tensor  # [D] dense
    threshold: Tensor  # [T]


class LossAndGrads(NamedTuple):
    """Result of `sparse_loss_and_grads`; scalars stay on the device (no synchronisation)."""

    loss: Tensor  # [] reconstruction + sparsity
    reconstruction: Tensor  # [] sum over D of the squared error, mean over B
    sparsity: Tensor  # [] coefficient applied
    x_hat: Tensor  # [B, D] fp32
    l0: Tensor  # [B] fp32 active latents per row
    indices: Tensor  # [B, K] int64 each row's active latents by descending value, (0, 0) padded
    values: Tensor  # [B, K] fp32 matching values (> 0 marks a used slot)
    fire_counts: Tensor  # [F] int32 rows in which each latent fired
    touched: Tensor  # [T] int64 ascending: fired or in the STE window
    grads: CompactGrads
    window_pairs: int  # pairs inside the STE window, batch total
    reruns: int  # 1 when a row overflowed the first encode capacity


def sparsity_term(mean_l0: Tensor, kind: str, coefficient: float, target_l0: float) -> tuple[Tensor, Tensor]:
    """(S, dS/dm) of the sparsity term S(m), m = mean_b L0, as 0-dim fp32 tensors (sae/objectives.py)."""
    if kind == "l0":
        return coefficient * mean_l0, torch.full_like(mean_l0, coefficient)
    if kind == "target_l0":
        if not target_l0 > 0:
            raise ValueError(f"target_l0 must be > 0; got {target_l0}")
        gap = mean_l0 / target_l0 - 1.0
        return coefficient * gap**2, (2.0 * coefficient / target_l0) * gap
    raise ValueError(f"unknown sparsity objective {kind!r}; use one of {SPARSITY_KINDS}")


@torch.no_grad()
def sparse_loss_and_grads(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: float,
    sparsity: str,
    coefficient: float,
    target_l0: float,
    *,
    compute_dtype: torch.dtype | None = None,
    operands: tuple[Tensor, Tensor] | None = None,
    capacity: int | None = None,
    window_capacity: int | None = None,
    blocks: Blocks = Blocks(),
) -> LossAndGrads:
    """Forward, loss and backward of one SAE training step, with compact gradients (module docstring).

    Args:
        x: [B, D]; W_enc [D, F]; b_enc [F]; W_dec [F, D]; b_dec [D]; threshold [F] (> 0); contiguous, on
            CUDA (or CPU under TRITON_INTERPRET=1). bandwidth: the STE window width eps.
        sparsity, coefficient, target_l0: the sparsity term ("l0" or "target_l0", sae/objectives.py).
        compute_dtype: the products' operand dtype (e.g. torch.bfloat16 beside fp32 parameters); None: the
            inputs' own. The gradients come in the parameters' dtypes either way.
        operands: (W_enc, W_dec) already in compute_dtype (a kept copy: no [F, D] cast this step); default:
            cast here.
        capacity, window_capacity, blocks: as in `kernels.sae_step.sae_forward_sparse`.
    The loss's gradients equal autograd's through `kernels.reference.sae_forward` + `sae.objectives.sae_loss`
    (tests/test_sparse_step.py); no parameter's `.grad` is read or written.
    """
    if sparsity not in SPARSITY_KINDS:
        raise ValueError(f"unknown sparsity objective {sparsity!r}; use one of {SPARSITY_KINDS}")
    check_sae_inputs(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth)
    ops = _operands(x, W_enc, W_dec, compute_dtype, operands)
    code, indices, values = encode_sorted(
        ops.x, ops.W_enc, b_enc, ops.W_dec, b_dec, threshold, bandwidth, capacity, window_capacity, blocks
    )
    (B, D), F = x.shape, W_enc.shape[1]
    x_hat = dec.decode_rows(indices, values, code.counts, ops.W_dec, b_dec, torch.float32, blocks.rows)

    diff = x_hat - x.float()
    reconstruction = diff.pow(2).sum(-1).mean()
    l0 = code.counts.float()
    sparsity_value, d_mean_l0 = sparsity_term(l0.mean(), sparsity, coefficient, target_l0)
    g = diff.mul_(2.0 / B)  # [B, D] dL/dx_hat (diff is not needed again)
    g_l0 = (d_mean_l0 / B).expand(B).contiguous()  # [B] dL/dl0_b, the same for every row

    dz = dec.gather_dot(g, ops.W_dec, indices, code.counts, blocks.rows)
    active = lg.latent_major(indices, code.counts, F, code.fire_counts)
    window = lg.latent_major(code.window, code.window_counts, F)
    touched = torch.unique(torch.cat([active.latents, window.latents]))  # sorted, distinct
    T = touched.numel()
    rank_active = torch.searchsorted(touched, active.latents)
    rank_window = torch.searchsorted(touched, window.latents)

    encoder = lg.EncoderPairs(dz, ops.x, b_dec, W_enc.dtype, b_enc.dtype, launch.operand_dtype(ops.x, ops.W_enc))
    weights = lg.latent_grads(active, values, g, (T, D), W_dec.dtype, encoder, blocks.pairs, out_rows=rank_active)
    d_theta = tg.threshold_grad(window, g, g_l0, ops.W_dec, threshold, bandwidth, blocks.pairs, rank_window, T)
    # sum_b dL/dx[b] through the encoder = W_enc @ d b_enc, over the fired columns only ([D, L] gather).
    d_b_dec = g.sum(0) - ops.W_enc.index_select(1, active.latents).float() @ weights.b_enc[rank_active].float()

    grads = CompactGrads(weights.W_enc, weights.b_enc, weights.W_dec, d_b_dec.to(b_dec.dtype), d_theta)
    return LossAndGrads(
        reconstruction + sparsity_value, reconstruction, sparsity_value, x_hat, l0, indices, values,
        code.fire_counts, touched, grads, int(code.window_counts.sum()), code.reruns,
    )  # fmt: skip


def _operands(
    x: Tensor, W_enc: Tensor, W_dec: Tensor, compute_dtype: torch.dtype | None, kept: tuple[Tensor, Tensor] | None
) -> Operands:
    """The products' operands: all cast here, or x cast here beside the caller's kept (W_enc, W_dec) copies."""
    if kept is None:
        return cast_operands(x, W_enc, W_dec, compute_dtype)
    for name, copy, master in (("W_enc", kept[0], W_enc), ("W_dec", kept[1], W_dec)):
        dtype = compute_dtype if rounds_to(master.dtype, compute_dtype) else master.dtype
        if copy.shape != master.shape or copy.dtype != dtype or copy.device != master.device:
            raise ValueError(f"operands: the {name} copy is {copy.dtype} {tuple(copy.shape)} on {copy.device}; "
                             f"compute_dtype {compute_dtype} needs {dtype} {tuple(master.shape)} on {master.device}")
    check_compute_dtype(compute_dtype)
    return Operands(launch.cast_operand(x, compute_dtype), *kept)


def optimizer_bytes(D: int, F: int, T: int, elt: int = 4) -> tuple[int, int]:
    """(dense, sparse) bytes moved per step by what follows the backward on the two [F, D] weight matrices.

    Counted per weight element in units of `elt` (fp32 master weights: 4), one read or write each, torch's
    unfused ops as the trainer calls them (single-tensor Adam):
        dense, per element of both matrices: gradient zero fill 1, clip (norm 1, scale 2) 3, Adam with
            betas (0, beta2) (lerp of the redundant first moment 3, v decay 2, addcmul 4, sqrt 2, bias
            division 2, + eps 2, addcdiv 4) 19; W_dec only: projection 9, renormalisation 3.
            -> (23 + 23 + 12) * D * F = 58 * D * F
        sparse, per element of the touched T columns / rows: clip 3, LazyAdam (gather p, v 4; v decay 2,
            addcmul 4, sqrt 2, division 2, + eps 2, addcdiv 4; scatter p, v 4) 24; W_dec only: row gather 2 +
            projection 9, renormalisation with gather and scatter 7.
            -> (27 + 27 + 18) * D * T = 72 * D * T
    The sparse step wins when T < 0.8 F; it also holds no first moment (2 * D * F * elt bytes less memory).
    """
    return 58 * D * F * elt, 72 * D * T * elt
