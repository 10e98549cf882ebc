"""What every Triton launcher in `kernels/` shares: where kernels may run, input checks, output allocation.

Kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, set before
any module defining a kernel is imported; this is how the tests run without a GPU).
"""

from __future__ import annotations

import os

import torch
import triton.language as tl
from torch import Tensor

from kernels.validate import rounds_to


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
            raise ValueError(
                f"{name} is bfloat16, which Triton's interpreter cannot read; test in float32, or with "
                "float16 (compute_dtype=torch.float16 runs the same 16-bit path)"
            )
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (got strides {t.stride()}); call .contiguous() first")


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def operand_dtype(*tensors: Tensor) -> torch.dtype:
    """The products' operand dtype: 16-bit when every operand is (tensor cores), else float32."""
    kinds = {t.dtype for t in tensors}
    return kinds.pop() if len(kinds) == 1 and kinds <= {torch.bfloat16, torch.float16} else torch.float32


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    return _TL_DTYPES[dtype]


def dot_dtype(*tensors: Tensor) -> tl.dtype:
    """`operand_dtype` as a Triton type, for `tl.dot` and for rounding x - b_dec the way `tl.dot` sees it."""
    return _TL_DTYPES[operand_dtype(*tensors)]


def cast_operand(t: Tensor, compute_dtype: torch.dtype | None) -> Tensor:
    """t as the products' operand: a detached contiguous compute_dtype copy when `rounds_to`, else t itself."""
    return t.detach().to(compute_dtype).contiguous() if rounds_to(t.dtype, compute_dtype) else t


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialised buffer for a kernel to fill; the tests replace this to poison buffers with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)
