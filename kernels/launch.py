"""What every Triton launcher in `kernels/` shares: where kernels may run, input checks, output allocation.

Kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, set before
any module defining a kernel is imported; this is how the tests run without a GPU).
"""

from __future__ import annotations

import os

import torch
import triton.language as tl
from torch import Tensor


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (fixed when the kernel modules are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_kernel_tensors(**tensors: Tensor) -> None:
    """Raise ValueError unless every tensor is contiguous and on a device the kernels can run on.

    The kernels index with implicit row-major strides, so a non-contiguous view would be read wrongly.
    """
    interp = interpreting()
    for name, t in tensors.items():
        if t.device.type == "cuda":
            if interp:
                raise ValueError(f"{name} is on {t.device} but TRITON_INTERPRET=1 runs kernels on CPU tensors")
        elif not (interp and t.device.type == "cpu"):
            raise ValueError(
                f"{name} is on {t.device}: the Triton kernels need CUDA tensors (or CPU tensors with "
                "TRITON_INTERPRET=1 set before importing kernels); use kernels.reference elsewhere"
            )
        if interp and t.dtype == torch.bfloat16:
            raise ValueError(f"{name} is bfloat16, which Triton's interpreter cannot read; test in float32")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (got strides {t.stride()}); call .contiguous() first")


def dot_dtype(*tensors: Tensor) -> tl.dtype:
    """Operand type of `tl.dot`: 16-bit when every operand is 16-bit (tensor cores), else float32."""
    kinds = {t.dtype for t in tensors}
    if kinds == {torch.bfloat16}:
        return tl.bfloat16
    if kinds == {torch.float16}:
        return tl.float16
    return tl.float32


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialised buffer for a kernel to fill; the tests replace this to poison buffers with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)
