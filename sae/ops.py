"""The one place where the SAE forward's implementation is chosen: the PyTorch reference or the Triton kernels.

Both have the signature of `kernels.reference.sae_forward` and agree in outputs and every gradient (tests/).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import reference
from kernels.reference import Forward
from sae.errors import ConfigError

BACKENDS = ("auto", "reference", "triton")


def resolve_backend(name: str, device: torch.device) -> str:
    """"auto" is "triton" on CUDA and "reference" elsewhere; "triton" off CUDA needs Triton's interpreter."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown SAE backend {name!r}; choose one of {BACKENDS}")
    if name == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if name == "triton" and device.type != "cuda":
        from kernels.launch import interpreting

        if not interpreting():
            raise ConfigError(
                f"--backend triton needs a CUDA device (the run's device is {device}); use --backend reference, "
                "or set TRITON_INTERPRET=1 to run the kernels in Triton's (slow) CPU interpreter"
            )
    return name


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
    """JumpReLU SAE forward (see `kernels.reference.sae_forward`) on a resolved backend."""
    if backend == "triton":
        from kernels.sae_step import sae_forward as triton_forward

        return triton_forward(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth)
    if backend == "reference":
        return reference.sae_forward(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth)
    raise ValueError(f"backend {backend!r} is not resolved; call resolve_backend first")
