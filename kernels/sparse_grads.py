"""One JumpReLU SAE training step's loss and COMPACT gradients, without autograd through the SAE and without a
dense gradient.

`sae_forward_sparse` (kernels/sae_step.py) already avoids every [B, F] tensor, but its autograd backward
returns dense d W_enc [D, F] and d W_dec [F, D] (zero-filled, then written at the fired latents only), and
the optimizer then reads and writes every element of both. Here the same forward and backward
(`kernels.sae_pipeline.sae_fwd`, `sae_bwd`, where the formulas are) run in compact mode:

    touched  [T] int64 ascending: every latent that fired in the batch or had a pair in the threshold's STE
             window (union), i.e. every latent with a non-zero gradient in any latent parameter
    W_enc    [D, T]  column r = d W_enc[:, touched[r]]     (the layout `sae.sparse_adam.LazyAdam` takes)
    W_dec    [T, D]  row r    = d W_dec[touched[r]]
    b_enc    [T], threshold [T]                           zero for a latent only in the window / only active
    b_dec    [D]     dense

Every gradient of a latent outside `touched` is exactly zero, so with Adam(0, beta2) (`LazyAdam`) the step
touches O(T * D) bytes instead of O(F * D).

The loss is the caller's `objective` (e.g. `sae.objectives.Objective`, the trainer's), a function of two [B]
vectors only: the per-token errors e_b = sum_d (x_hat - x)[b, d]^2 and the rows' L0. Autograd through the
objective alone (two [B] leaves, no SAE) gives dL/de and dL/dl0, and then

    dL/dx_hat[b] = 2 (x_hat - x)[b] * dL/de[b]          dL/dl0[b] as given        (the backward's inputs)

so any objective of (errors, l0), TERM's tilted mean included, trains on this path exactly as on the dense one.

Mixed precision (`compute_dtype`): x, W_enc and W_dec enter the products as compute_dtype copies (`operands`
lets the caller pass W_enc and W_dec copies it keeps up to date, see sae/model.py `OperandCache`), the loss is
taken against the un-rounded x, and the compact gradients are allocated in the master parameters' dtypes.

Bytes saved against the dense step (`optimizer_bytes`): the dense path zero-fills two [F, D] gradients,
projects, clips, runs torch's Adam (with a first moment that beta1 = 0 makes redundant) and renormalises over
all 2 * F * D weights; the sparse one gathers, updates and scatters only 2 * T * D.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from kernels import sae_pipeline as pipe


class Objective(Protocol):
    """The training loss from per-token squared errors [B] and per-row L0 [B] (fp32 leaves requiring grad):
    a sequence of scalars whose first is the total that is differentiated (`sae.objectives.Objective` returns
    its `Loss`). The kernels never import `sae`: any callable of this shape will do."""

    def __call__(self, errors: Tensor, l0: Tensor) -> Sequence[Tensor]: ...


class CompactGrads(NamedTuple):
    """Gradients of the touched latents only, in each parameter's dtype (`_asdict()` feeds `LazyAdam.step`)."""

    W_enc: Tensor  # [D, T]
    b_enc: Tensor  # [T]
    W_dec: Tensor  # [T, D]
    b_dec: Tensor  # [D] dense
    threshold: Tensor  # [T]


class LossAndGrads(NamedTuple):
    """Result of `sparse_loss_and_grads`; scalars stay on the device (no synchronisation)."""

    terms: Sequence[Tensor]  # the objective's result, detached (same type: `Loss` for `sae.objectives.Objective`)
    x_hat: Tensor  # [B, D] fp32
    l0: Tensor  # [B] fp32 active latents per row
    indices: Tensor  # [B, K] int64 each row's active latents by descending value, (0, 0) padded
    values: Tensor  # [B, K] fp32 matching values (> 0 marks a used slot)
    fire_counts: Tensor  # [F] int32 rows in which each latent fired
    touched: Tensor  # [T] int64 ascending: fired or in the STE window
    grads: CompactGrads
    window_pairs: int  # pairs inside the STE window, batch total
    reruns: int  # 1 when a row overflowed the first encode capacity


@torch.no_grad()
def sparse_loss_and_grads(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: float,
    objective: Objective,
    *,
    compute_dtype: torch.dtype | None = None,
    operands: tuple[Tensor, Tensor] | None = None,
    capacity: int | None = None,
    window_capacity: int | None = None,
    blocks: pipe.Blocks = pipe.Blocks(),
) -> LossAndGrads:
    """Forward, loss and backward of one SAE training step, with compact gradients (module docstring).

    Args:
        x: [B, D]; W_enc [D, F]; b_enc [F]; W_dec [F, D]; b_dec [D]; threshold [F] (> 0); contiguous, on
            CUDA (or CPU under TRITON_INTERPRET=1). bandwidth: the STE window width eps.
        objective: the loss of (errors [B], l0 [B]) (`Objective`), e.g. `sae.objectives.Objective`.
        compute_dtype: the products' operand dtype (e.g. torch.bfloat16 beside fp32 parameters); None: the
            inputs' own. The gradients come in the parameters' dtypes either way.
        operands: (W_enc, W_dec) already in compute_dtype (a kept copy: no [F, D] cast this step); default:
            cast here.
        capacity, window_capacity, blocks: as in `kernels.sae_step.sae_forward_sparse`.
    The loss's gradients equal autograd's through `kernels.reference.sae_forward` + the same objective
    (tests/test_sparse_step.py); no parameter's `.grad` is read or written.
    """
    ops = pipe.checked_operands(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, compute_dtype, operands)
    x_hat, active = pipe.sae_fwd(
        ops, b_enc, b_dec, threshold, bandwidth, torch.float32, capacity, window_capacity, blocks
    )

    diff = x_hat - x.float()  # [B, D]
    l0 = active.code.counts.float()
    terms, d_errors, d_l0 = _objective_grads(objective, diff.pow(2).sum(-1), l0)
    g = diff.mul_((2.0 * d_errors).unsqueeze(1))  # [B, D] dL/dx_hat (diff is not needed again)

    dtypes = pipe.GradDtypes(W_enc.dtype, b_enc.dtype, W_dec.dtype)
    grads = pipe.sae_bwd(ops, b_dec, threshold, bandwidth, active, g, d_l0, dtypes, blocks, compact=True)
    code = active.code
    return LossAndGrads(
        terms, x_hat, l0, active.indices, active.values, code.fire_counts, grads.touched,
        CompactGrads(grads.W_enc, grads.b_enc, grads.W_dec, grads.b_dec, grads.threshold),
        int(code.window_counts.sum()), code.reruns,
    )  # fmt: skip


def _objective_grads(objective: Objective, errors: Tensor, l0: Tensor) -> tuple[Sequence[Tensor], Tensor, Tensor]:
    """(the objective's terms detached, dL/derrors [B], dL/dl0 [B]) by autograd through the objective alone."""
    with torch.enable_grad():
        errors, l0 = errors.detach().requires_grad_(), l0.detach().requires_grad_()
        terms = objective(errors, l0)
        d_errors, d_l0 = torch.autograd.grad(terms[0], (errors, l0), allow_unused=True, materialize_grads=True)
    detached = [t.detach() for t in terms]
    terms = terms._make(detached) if hasattr(terms, "_make") else type(terms)(detached)  # a NamedTuple keeps its type
    return terms, d_errors, d_l0.contiguous()


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
