"""The one place where the SAE forward's implementation is chosen."""

from __future__ import annotations

from torch import Tensor

from kernels import reference
from kernels.reference import Forward


def sae_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: float,
    backend: str = "reference",
) -> Forward:
    """JumpReLU SAE forward (see `kernels.reference.sae_forward`) on the named backend."""
    if backend == "reference":
        return reference.sae_forward(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth)
    raise ValueError(f"unknown SAE backend {backend!r}; available: 'reference'")
