"""The one place where the SAE forward's implementation is chosen: the PyTorch reference or the Triton kernels.

Both have the signature of `kernels.reference.sae_forward` and agree in outputs and every gradient (tests/),
including under `compute_dtype` (mixed precision: 16-bit products, fp32 accumulation and master weights).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from harvest.config import DtypeName
from harvest.lm import resolve_device
from kernels import reference
from kernels.reference import Forward
from sae.errors import ConfigError

Backend = Literal["auto", "reference", "triton"]
BACKENDS: tuple[str, ...] = get_args(Backend)
# Names of the products' operand dtypes (`SAEConfig.compute_dtype`). bfloat16 is the H100 choice; float16 is
# what Triton's CPU interpreter can run, so the tests use it to exercise the same 16-bit code paths.
COMPUTE_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(DtypeName)}


def resolve_compute_dtype(name: str | torch.dtype, backend: str) -> torch.dtype:
    """The torch dtype of a `compute_dtype` name, refused early where the resolved backend cannot run it."""
    dtype = COMPUTE_DTYPES.get(name) if isinstance(name, str) else name
    if dtype not in COMPUTE_DTYPES.values():
        raise ConfigError(f"unknown compute dtype {name!r}; choose one of {tuple(COMPUTE_DTYPES)}")
    if backend == "triton" and dtype == torch.bfloat16:
        from kernels.launch import interpreting

        if interpreting():
            raise ConfigError(
                "--compute-dtype bfloat16 cannot run in Triton's CPU interpreter (it cannot read bf16); use "
                "float16 to exercise the 16-bit kernel path there, or float32"
            )
    return dtype


def resolve_backend(name: str, device: torch.device) -> str:
    """ "auto" is "triton" on CUDA and "reference" elsewhere; "triton" off CUDA needs Triton's interpreter."""
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


class Compute(NamedTuple):
    """Where and how a run's SAE computes, resolved once from the config's "auto"s."""

    device: torch.device
    backend: str  # "reference" or "triton"
    dtype: torch.dtype  # the products' operand dtype


def resolve_compute(backend: str, compute_dtype: str, device: str) -> Compute:
    """The run's device ("auto": cuda when available), backend ("auto": triton on CUDA) and compute dtype
    ("auto": bfloat16 on CUDA, float32 elsewhere), each refused early where it cannot run."""
    resolved = resolve_device(device)
    name = resolve_backend(backend, resolved)
    if compute_dtype == "auto":
        compute_dtype = "bfloat16" if resolved.type == "cuda" else "float32"
    return Compute(resolved, name, resolve_compute_dtype(compute_dtype, name))


def sae_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: float,
    backend: str = "reference",
    compute_dtype: torch.dtype | None = None,
) -> Forward:
    """JumpReLU SAE forward (see `kernels.reference.sae_forward`) on a resolved backend.

    compute_dtype: e.g. torch.bfloat16 beside fp32 parameters: x, W_enc and W_dec enter the products rounded to
    it, every sum and every gradient stays in the parameters' dtype; None: the inputs' own dtypes.
    """
    if backend == "triton":
        from kernels.sae_step import sae_forward as triton_forward

        return triton_forward(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, compute_dtype)
    if backend == "reference":
        return reference.sae_forward(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, compute_dtype)
    raise ValueError(f"backend {backend!r} is not resolved; call resolve_backend first")
