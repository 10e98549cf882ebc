"""FLOP and byte counts of every case: the useful arithmetic of its algorithm and the fewest bytes it must
move through device memory (each input read once, each output and unavoidable intermediate written once).

Each implementation is counted by its own algorithm: the Triton path by the sparse one (the kernels'
`flops_and_bytes`), the dense reference and its torch.compile by the dense one; the sparse decode's reference
has the kernel's signature and algorithm, so both share one count. Shapes: B tokens, D d_in, F d_sae, K mean
active latents per row, W mean STE-window pairs per row, T touched latents (fired or in a window) per batch;
all SAE tensors are float32 (4 bytes), as the trainer holds them, except the products' operands of the 16-bit
step cases (`elt` = 2 bytes per element of x, W_enc, W_dec and of the [B, F] operands, as they are read by the
products). K, W and T are measured on each case's data.
"""

from __future__ import annotations

FP32 = 4


def encode_sparse(B: int, D: int, F: int, K: float, W: float, elt: int = FP32) -> tuple[float, float]:
    """`kernels.jumprelu_encode.flops_and_bytes`: 2BDF FLOPs; reads x and W_enc once (`elt` bytes per element),
    writes 8 bytes per active pair and 4 per window pair (the compact lists) plus the counters."""
    from kernels import jumprelu_encode

    return jumprelu_encode.flops_and_bytes(B, D, F, round(K), round(W), elt=elt)


def gemm(B: int, D: int, F: int, elt: int) -> tuple[float, float]:
    """A plain product x [B, D] @ W_enc [D, F] in `elt`-byte operands and output: 2BDF FLOPs, each operand read
    once and the [B, F] output written once."""
    return 2 * B * D * F, elt * (B * D + D * F + B * F)


def encode_dense(B: int, D: int, F: int) -> tuple[float, float]:
    """`kernels.reference.encode`: 2BDF FLOPs (the elementwise JumpReLU is not counted); reads x, W_enc,
    b_enc, theta, b_dec, writes the dense activations f [B, F] and the L0 [B]."""
    return 2 * B * D * F, FP32 * (B * D + D * F + 2 * F + D + B * F + B)


def threshold_sparse(B: int, D: int, F: int, W: float) -> tuple[float, float]:
    """`kernels.threshold_grad.flops_and_bytes`: D adds per window pair and a D-long dot product per latent
    with pairs; reads one fp32 dL/dx_hat row per window pair and one decoder row per such latent. The
    latent-major regrouping of the pair list (torch sorts, in the timed region) is not counted."""
    from kernels import threshold_grad

    return threshold_grad.flops_and_bytes(B, D, F, round(W))


def threshold_dense(B: int, D: int, F: int) -> tuple[float, float]:
    """Dense threshold gradient from the saved z [B, F]: dL/df = dL/dx_hat W_dec^T (2BDF FLOPs), then the
    window sums of both sparsity paths (~6 FLOPs per (b, j)); reads z, dL/dx_hat, W_dec, dL/dl0, theta,
    writes d theta [F]."""
    return 2 * B * D * F + 6 * B * F, FP32 * (B * F + B * D + D * F + B + 2 * F)


def decode(B: int, D: int, F: int, K: int) -> tuple[float, float]:
    """Sparse decode forward and backward (`kernels.sparse_decode.flops_and_bytes`, 6BKD FLOPs: decode,
    dL/d values, dL/dW_dec), with the decoder gradient counted as the dense [F, D] tensor it is returned as
    (every row written once, the rows no pair touches as zeros)."""
    from kernels import sparse_decode

    flops, nbytes = sparse_decode.flops_and_bytes(B, D, F, K, elt=FP32)
    return flops, nbytes + (F - min(F, B * K)) * D * FP32


def step_sparse(B: int, D: int, F: int, K: float, W: float, T: int, elt: int = FP32) -> tuple[float, float]:
    """`sparse_train_step`: `kernels.sae_step.flops_and_bytes` (forward and backward: the encode's 2BDF, the
    K-row gathers of decode, dz and dL/dx, the latent-major weight gradients, the threshold gradient; x, W_enc
    and W_dec read as `elt`-byte operands) less its last term, the zero fill of two dense [F, D] gradients (this
    step writes compact [T, D] ones, which latent_grads already counts), plus the optimizer over the touched
    latents on the fp32 masters: the sparse bytes of `kernels.sparse_grads.optimizer_bytes` (72 * 4 * D * T) and
    ~10 FLOPs per updated weight (2 * D * T). With 16-bit operands (elt < 4) also what the mixed-precision step
    moves to keep them: x cast once (B * D * (4 + elt)) and the kept W_enc / W_dec copies re-rounded at the
    touched latents (2 * T * D * (4 + elt)); the [F, D] copies are never re-cast."""
    from kernels import sae_step, sparse_grads

    flops, nbytes = sae_step.flops_and_bytes(B, D, F, round(K), round(W), elt=elt)
    _, optimizer = sparse_grads.optimizer_bytes(D, F, T, elt=FP32)
    casts = 0 if elt == FP32 else (B * D + 2 * T * D) * (FP32 + elt)
    return flops + 10 * 2 * D * T, nbytes - 2 * D * F * FP32 + optimizer + casts


def step_dense(B: int, D: int, F: int, elt: int = FP32) -> tuple[float, float]:
    """The dense reference step (Trainer.train_step's dense branch), 12BDF + 20DF FLOPs: the forward's
    (x - b_dec) W_enc and f W_dec, the backward's f^T dL/dx_hat, dL/dx_hat W_dec^T, (x - b_dec)^T dL/dz and
    dL/dz W_enc^T (b_dec's pre-encoder gradient), 2BDF each; ~10 FLOPs per weight in the optimizer.
    Bytes, with `elt` bytes per operand element of the products (4; 2 under bf16 autocast): the [B, F] tensors
    the dense algorithm must materialise, f and dL/dz, each written and read once as operands (4 * elt * BF);
    x and dL/dx_hat (2 * elt * BD); both weight matrices read in the forward and again in the backward
    (4 * elt * DF); under autocast also the cast of both fp32 masters to elt bytes each step (2 * (4 + elt) * DF);
    the optimizer as torch runs it on the fp32 masters: the dense bytes of `kernels.sparse_grads.optimizer_bytes`
    (58 * 4 * D * F)."""
    from kernels import sparse_grads

    optimizer, _ = sparse_grads.optimizer_bytes(D, F, 0, elt=FP32)
    casts = 0 if elt == FP32 else 2 * (FP32 + elt) * D * F
    return 12 * B * D * F + 10 * 2 * D * F, 4 * elt * B * F + 2 * elt * B * D + 4 * elt * D * F + casts + optimizer


def lm_forward(config, layer: int, tokens: int, forwards: int, context: int, elt: int) -> tuple[float, float]:
    """`forwards` forwards of decoder layers 0..layer of a Gemma-like model (no final norm, no LM head) over
    `tokens` tokens in all.

    FLOPs: 2 per weight per token for the attention projections (q and o: H * hd * d each; k and v:
    KV * hd * d each) and the gated MLP (3 * d * d_ff), plus eager attention's two [T, T] products per head
    (scores and weighted sum, 4 * context * H * hd per token: full rows, no causal saving). Norms, rotary
    embeddings and softmax are not counted. Bytes: every weight of those layers read once per forward, the
    embedding rows gathered and the hooked layer's output written (d * elt per token
    each). Padding is not modelled: rows are taken as full `context`-token rows.
    """
    text = config.get_text_config()
    d, hd, H, KV, d_ff = (
        text.hidden_size,
        text.head_dim,
        text.num_attention_heads,
        text.num_key_value_heads,
        text.intermediate_size,
    )
    layers = layer + 1
    weights = layers * (2 * H * hd * d + 2 * KV * hd * d + 3 * d * d_ff)
    flops = 2 * weights * tokens + 4 * context * H * hd * layers * tokens
    return flops, forwards * weights * elt + 2 * tokens * d * elt
