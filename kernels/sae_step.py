"""The JumpReLU SAE training step on Triton kernels: `sae_forward`, a drop-in for `kernels.reference.sae_forward`.

An autograd Function over the step's one forward and one backward (`kernels.sae_pipeline.sae_fwd`, `sae_bwd`,
where the formulas are): dense gradients, dL/dx only when x requires it. No [B, F] tensor is ever written.

Mixed precision (`compute_dtype`, e.g. bf16 with fp32 master parameters): x, W_enc and W_dec are cast to
compute_dtype once per call and only those copies feed the kernels' products (the encode's tensor cores, the
decoder row gathers); biases and thresholds stay in their dtype, every sum is fp32, and the gradients come back in
the master parameters' dtypes. `kernels.reference.sae_forward` with the same `compute_dtype` is the oracle.

Memory at B = 4096, D = 2304, F = 2^20, L0 = 64 (fp32 master weights): the compact lists take
B * capacity * 8 bytes (2 MiB at capacity 64) where the dense path holds z and f (32 GiB) plus their
gradients; what remains is the parameters, their gradients and Adam's moments (each 2 * D * F * 4 =
19.3 GB for the two weight matrices). FLOPs: the encode's 2 * B * D * F (19.8 TFLOP) against
~10 * B * L0 * D (6 GFLOP) for everything else; see `flops_and_bytes`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kernels import jumprelu_encode as enc
from kernels import latent_grads as lg
from kernels import sae_pipeline as pipe
from kernels import threshold_grad as tg
from kernels.reference import Forward, count_dtype


class SparseForward(NamedTuple):
    """`Forward` plus what the sparse path knows for free."""

    x_hat: Tensor  # [B, D] in x's dtype
    l0: Tensor  # [B] fp32 (fp64 for fp64 x), STE gradient into threshold
    indices: Tensor  # [B, K] int64, each row's active latents by descending value, padded with 0
    values: Tensor  # [B, K] matching values, padded with 0
    fire_counts: Tensor  # [F] int32 rows in which each latent fired
    window_pairs: int  # pairs inside the STE window, batch total
    capacity: int  # slots per row of the final encode run
    reruns: int  # 1 when a row overflowed the first capacity and the encode ran again


class _SAEStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, ops, capacity, window_capacity, blocks):
        x_hat, active = pipe.sae_fwd(
            ops, b_enc, b_dec, threshold, bandwidth, x.dtype, capacity, window_capacity, blocks
        )
        ctx.save_for_backward(*ops, b_dec, threshold)
        ctx.active, ctx.bandwidth, ctx.blocks = active, bandwidth, blocks
        ctx.x_dtype, ctx.dtypes = x.dtype, pipe.GradDtypes(W_enc.dtype, b_enc.dtype, W_dec.dtype)
        # `active` is no tensor: autograd passes it through untracked.
        return x_hat, active.code.counts.to(count_dtype(x.dtype)), active

    @staticmethod
    def backward(ctx, g_x_hat, g_l0, _):
        x, W_enc, W_dec, b_dec, threshold = ctx.saved_tensors  # x, W_enc, W_dec: the operands
        B = x.shape[0]
        g = torch.zeros_like(x, dtype=torch.float32) if g_x_hat is None else g_x_hat.contiguous()
        g_l0 = torch.zeros(B, dtype=torch.float32, device=x.device) if g_l0 is None else g_l0.contiguous()
        ops = pipe.Operands(x, W_enc, W_dec)
        grads = pipe.sae_bwd(ops, b_dec, threshold, ctx.bandwidth, ctx.active, g, g_l0, ctx.dtypes, ctx.blocks,
                             grad_x=ctx.needs_input_grad[0])  # fmt: skip
        d_x = None if grads.x is None else grads.x.to(ctx.x_dtype)
        return d_x, grads.W_enc, grads.b_enc, grads.W_dec, grads.b_dec, grads.threshold, *(None,) * 5


def sae_forward_sparse(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: float,
    *,
    compute_dtype: torch.dtype | None = None,
    capacity: int | None = None,
    window_capacity: int | None = None,
    blocks: pipe.Blocks = pipe.Blocks(),
) -> SparseForward:
    """`sae_forward` with the encode's capacities and tile sizes exposed and its bookkeeping returned.

    Args:
        compute_dtype: the products' operand dtype (module docstring); None: the inputs' own.
        capacity, window_capacity: active / window slots per row to try first (default min(F, 128)); a
            row with more makes the encode run once more with exactly enough slots (`reruns` = 1).
        blocks: tile sizes.
    """
    ops = pipe.checked_operands(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, compute_dtype)
    x_hat, l0, active = _SAEStep.apply(
        x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, ops, capacity, window_capacity, blocks
    )
    code = active.code
    return SparseForward(
        x_hat, l0, active.indices, active.values.to(x.dtype), code.fire_counts, int(code.window_counts.sum()),
        code.capacity, code.reruns,
    )  # fmt: skip


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
    """The JumpReLU SAE forward pass on Triton kernels; same signature, result and gradients as
    `kernels.reference.sae_forward` (differentiable w.r.t. x and every parameter), without [B, F] tensors.

    Args:
        x: [B, D] activations.
        W_enc: [D, F]; b_enc: [F]; W_dec: [F, D]; b_dec: [D] (also the pre-encoder bias).
        threshold: [F] thresholds (> 0, checked).
        bandwidth: STE window width eps.
        compute_dtype: e.g. torch.bfloat16 with fp32 parameters: x, W_enc, W_dec are cast to it for the
            products (fp32 accumulation); None: the inputs' dtypes (16-bit x and W_enc then use 16-bit
            tensor-core products too).
    All contiguous, on CUDA (or CPU under TRITON_INTERPRET=1). Every sum is fp32 and the gradients come in
    each parameter's dtype.
    """
    out = sae_forward_sparse(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, compute_dtype=compute_dtype)
    return Forward(out.x_hat, out.l0, out.indices, out.values)


def flops_and_bytes(B: int, D: int, F: int, K: int, W: int = 0, elt: int = 2) -> tuple[int, int]:
    """One training step (forward + backward): useful FLOPs and minimum HBM bytes, for the benchmark.

    K: mean L0; W: mean window pairs per row; elt: bytes per x / weight element. The encode's
    2 * B * D * F dominates; every other term scales with B * K * D, plus the zero fill of the two
    dense weight gradients (2 * D * F * 4 bytes).
    """
    gather = (2 * B * K * D, B * K * D * elt + B * D * 4)  # one K-row gather per token: decode, dz, dL/dx
    parts = [
        enc.flops_and_bytes(B, D, F, K, W, elt),
        gather,
        gather,
        lg.flops_and_bytes(B, D, F, K),
        tg.flops_and_bytes(B, D, F, W),
        gather,
    ]
    return sum(p[0] for p in parts), sum(p[1] for p in parts) + 2 * D * F * 4
