"""Input checks shared by the reference and the kernels, run before any work so a mistake names itself.

Shapes, dtypes, devices and the bandwidth are host-side facts and always checked. The threshold's values
(JumpReLU needs theta > 0: at theta <= 0 every latent with z > theta "fires" with a value <= 0, which the
compact active set cannot tell from an unused slot, and the STE window straddles z = 0) live on the device:
reading them back is a synchronisation, ~10-50 us on a GPU and a stall of the launch queue. So they are
checked where that costs nothing:

- CPU tensors (the reference on the CPU, the kernels under TRITON_INTERPRET=1): here, directly;
- the Triton encode: its launcher already reads the rows' slot counts back once per call to size its
  output, and `bad_threshold_count` is read in that same transfer (one [F] comparison, F * 4 bytes);
- the reference on CUDA: read in the same transfer as the active set's K (`kernels.reference.sae_forward`).

So every call is checked and no call pays an extra synchronisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# `compute_dtype` of the reference and the kernels: the dtype x, W_enc and W_dec are rounded to for the products
# (None, or a dtype at least as wide as the tensor: no rounding). bf16 is the H100 choice; fp16 behaves alike and is
# what Triton's CPU interpreter can run, so it is how the CPU tests exercise the 16-bit plumbing of the kernels.
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_compute_dtype(compute_dtype: torch.dtype | None) -> None:
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES} (or None); got {compute_dtype}")


def rounds_to(dtype: torch.dtype, compute_dtype: torch.dtype | None) -> bool:
    """True when a `dtype` tensor is rounded for a product at `compute_dtype` (set, different and not wider)."""
    if compute_dtype is None or compute_dtype == dtype:
        return False
    return torch.finfo(compute_dtype).bits <= torch.finfo(dtype).bits


def check_sae_inputs(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, threshold: Tensor, bandwidth: float
) -> None:
    """Raise ValueError naming the offending argument when shapes, dtypes or devices do not fit together,
    the bandwidth is not a finite positive number, or (CPU tensors only, see the module docstring) a
    threshold is not > 0."""
    if x.dim() != 2:
        raise ValueError(f"x must be [B, D] (tokens x d_in); got shape {tuple(x.shape)}. Flatten leading dims first.")
    if W_enc.dim() != 2:
        raise ValueError(f"W_enc must be [D, F]; got shape {tuple(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    expected = {
        "x": (x, (x.shape[0], d_in)),
        "b_enc": (b_enc, (d_sae,)),
        "W_dec": (W_dec, (d_sae, d_in)),
        "b_dec": (b_dec, (d_in,)),
        "threshold": (threshold, (d_sae,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but W_enc [D={d_in}, F={d_sae}] implies {shape}")
    for name, tensor in {"W_enc": W_enc, **{k: v for k, (v, _) in expected.items()}}.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}; move them to one device")
    if not (bandwidth > 0 and math.isfinite(bandwidth)):
        raise ValueError(f"bandwidth must be a finite number > 0; got {bandwidth}")
    if threshold.device.type == "cpu":
        check_threshold_values(threshold, int(bad_threshold_count(threshold)))


def bad_threshold_count(threshold: Tensor) -> Tensor:
    """0-dim int64 on threshold's device: entries that are not > 0 (NaN included). No synchronisation."""
    return (~(threshold > 0)).sum()


def check_threshold_values(threshold: Tensor, bad: int) -> None:
    """Raise ValueError when `bad` (from `bad_threshold_count`, already read back) is non-zero."""
    if bad:
        threshold = threshold.detach()
        j = int((~(threshold > 0)).nonzero()[0, 0])
        raise ValueError(
            f"threshold must be > 0 (JumpReLU needs theta > 0): {bad} of {threshold.numel()} entries are <= 0 or "
            f"NaN, e.g. latent {j} = {float(threshold[j])}. Clamp them (the trainer keeps theta >= 1e-6)."
        )
