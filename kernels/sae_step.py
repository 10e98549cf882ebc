"""The JumpReLU SAE training step on Triton kernels: `sae_forward`, a drop-in for `kernels.reference.sae_forward`.

Forward: the fused encode (`jumprelu_encode`) writes each row's active pairs and STE-window pairs in compact
form; each row is then sorted by value (torch, [B, K]) and decoded by gathering K decoder rows
(`sparse_decode`). No [B, F] tensor is ever written. Backward, from the compact lists only:

    dz[b, k]          = dL/dx_hat[b] . W_dec[indices[b, k]]          (`gather_dot`; d f / d z = 1 there)
    W_dec, W_enc, b_enc                                             (`latent_grads`, latent-major)
    threshold         from the window pairs, both sparsity paths    (`threshold_grad`)
    x                 sum_k dz[b, k] * W_enc[:, indices[b, k]]       (`decode_rows` on W_enc^T), if needed
    b_dec             sum_b dL/dx_hat[b] - sum_b dL/dx[b]            (pre-encoder bias)

Mixed precision (`compute_dtype`, e.g. bf16 with fp32 master parameters): x, W_enc and W_dec are cast to
compute_dtype once per call and only those copies feed the kernels' products (the encode's tensor cores, the
decoder row gathers); biases and thresholds stay in their dtype, every sum is fp32, and the gradients come back in
the master parameters' dtypes. `kernels.reference.sae_forward` with the same `compute_dtype` is the oracle.

Everything after the encode is deterministic (no atomics; the encode's atomics only fix slot order, which
the per-row sort and the latent-major sort remove).

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
from kernels import launch
from kernels import sparse_decode as dec
from kernels import threshold_grad as tg
from kernels.reference import Forward, count_dtype
from kernels.validate import check_compute_dtype, check_sae_inputs


class Blocks(NamedTuple):
    """Tile sizes (powers of two). Defaults are meant for an H100; the CPU tests pass small ones."""

    encode: tuple[int, int, int] = (64, 128, 64)  # (rows, latents, d_in) of an encode tile
    rows: tuple[int, int] = (32, 128)  # (slots, d_in) of a decode / gather-dot program
    pairs: tuple[int, int] = (32, 128)  # (pairs, d_in) of a latent-major gradient program


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


def _sort_rows(idx: Tensor, val: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """[B, K] int64 indices and fp32 values, K = max(max L0, 1), each row by descending value, (0, 0) padded."""
    K = max(int(counts.max()) if counts.numel() else 0, 1)
    used = torch.arange(K, device=idx.device)[None, :] < counts[:, None]
    values, order = torch.where(used, val[:, :K], -torch.inf).sort(dim=1, descending=True, stable=True)
    indices = torch.where(used, idx[:, :K].gather(1, order).long(), 0)  # used slots stay first after sorting
    return indices, torch.where(used, values, 0.0)


class Operands(NamedTuple):
    """The products' operands: x, W_enc, W_dec in compute_dtype (the inputs themselves when not rounded)."""

    x: Tensor  # [B, D]
    W_enc: Tensor  # [D, F]
    W_dec: Tensor  # [F, D]


def cast_operands(x: Tensor, W_enc: Tensor, W_dec: Tensor, compute_dtype: torch.dtype | None) -> Operands:
    """Detached contiguous compute_dtype copies where `kernels.validate.rounds_to` says so (B * D + 2 * D * F
    elements read and written once), else the tensors themselves."""
    check_compute_dtype(compute_dtype)
    return Operands(*(launch.cast_operand(t, compute_dtype) for t in (x, W_enc, W_dec)))


class _SAEStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, blocks, code, indices, values, ops):
        x_hat = dec.decode_rows(indices, values, code.counts, ops.W_dec, b_dec, x.dtype, blocks.rows)
        ctx.save_for_backward(ops.x, ops.W_enc, ops.W_dec, b_dec, threshold, indices, values)
        ctx.code, ctx.bandwidth, ctx.blocks = code, bandwidth, blocks
        ctx.dtypes = x.dtype, W_enc.dtype, b_enc.dtype, W_dec.dtype  # of the gradients (the masters')
        return x_hat, code.counts.to(count_dtype(x.dtype))

    @staticmethod
    def backward(ctx, g_x_hat, g_l0):
        x, W_enc, W_dec, b_dec, threshold, indices, values = ctx.saved_tensors  # x, W_enc, W_dec: operands
        x_dtype, W_enc_dtype, b_enc_dtype, W_dec_dtype = ctx.dtypes
        code, blocks = ctx.code, ctx.blocks
        B, F = x.shape[0], W_enc.shape[1]
        g = torch.zeros_like(x, dtype=torch.float32) if g_x_hat is None else g_x_hat.contiguous()
        g_l0 = torch.zeros(B, dtype=torch.float32, device=x.device) if g_l0 is None else g_l0.contiguous()

        dz = dec.gather_dot(g, W_dec, indices, code.counts, blocks.rows)
        active = lg.latent_major(indices, code.counts, F, code.fire_counts)
        encoder = lg.EncoderPairs(dz, x, b_dec, W_enc_dtype, b_enc_dtype, launch.operand_dtype(x, W_enc))
        grads = lg.latent_grads(active, values, g, W_dec.shape, W_dec_dtype, encoder, blocks.pairs)
        window = lg.latent_major(code.window, code.window_counts, F)
        d_theta = tg.threshold_grad(window, g, g_l0, W_dec, threshold, ctx.bandwidth, blocks.pairs)

        d_x = None
        if ctx.needs_input_grad[0]:
            d_x = dec.decode_rows(indices, dz, code.counts, W_enc.t(), None, torch.float32, blocks.rows)
            d_b_dec = g.sum(0, dtype=torch.float32) - d_x.sum(0)
            d_x = d_x.to(x_dtype)
        else:  # sum_b dL/dx[b] = W_enc @ d b_enc, over the fired columns only
            fired = active.latents
            d_b_dec = g.sum(0, dtype=torch.float32) - W_enc[:, fired].float() @ grads.b_enc[fired].float()
        return d_x, grads.W_enc, grads.b_enc, grads.W_dec, d_b_dec.to(b_dec.dtype), d_theta, *(None,) * 6


def encode_sorted(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, threshold: Tensor, bandwidth: float,
    capacity: int | None, window_capacity: int | None, blocks: Blocks,
) -> tuple[enc.SparseCode, Tensor, Tensor]:
    """Checked inputs, the fused encode, and each row's active set sorted by value: (code, indices, values)."""
    check_sae_inputs(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth)
    launch.check_kernel_tensors(x=x, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold)
    with torch.no_grad():
        code = enc.jumprelu_encode(x, W_enc, b_enc, b_dec, threshold, bandwidth, capacity, window_capacity,
                                   blocks.encode)
        indices, values = _sort_rows(code.indices, code.values, code.counts)
    return code, indices, values


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
    blocks: Blocks = Blocks(),
) -> SparseForward:
    """`sae_forward` with the encode's capacities and tile sizes exposed and its bookkeeping returned.

    Args:
        compute_dtype: the products' operand dtype (module docstring); None: the inputs' own.
        capacity, window_capacity: active / window slots per row to try first (default min(F, 128)); a
            row with more makes the encode run once more with exactly enough slots (`reruns` = 1).
        blocks: tile sizes.
    """
    check_sae_inputs(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth)
    ops = cast_operands(x, W_enc, W_dec, compute_dtype)
    code, indices, values = encode_sorted(
        ops.x, ops.W_enc, b_enc, ops.W_dec, b_dec, threshold, bandwidth, capacity, window_capacity, blocks
    )
    x_hat, l0 = _SAEStep.apply(
        x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, blocks, code, indices, values, ops
    )
    return SparseForward(
        x_hat, l0, indices, values.to(x.dtype), code.fire_counts, int(code.window_counts.sum()),
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
