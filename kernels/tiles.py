"""Tile configs of every kernel in one place: block sizes, warps and pipeline stages per kernel and shape class.

Chosen from `python -m bench --static` (ptxas for sm_90, on the CPU): first no spills, then the largest tile.
Nothing here has been timed on a GPU; docs/performance.md section 4 lists what the first device call must measure
to confirm or replace each row. `@triton.autotune` with several configs cannot run in Triton's interpreter, so the
library launches one config per shape class; under the interpreter warps and stages are ignored, and the tests pass
their own small blocks (`kernels.sae_pipeline.Blocks`) to cover both sides of each block size.

Shape classes: the encode's by its product's operand type (16-bit operands use tensor cores and the
triangular-matrix prefix sum; fp32 operands use exact fp32 products and tl.cumsum); the other kernels gather rows
of D elements and have one class each.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Tile(NamedTuple):
    """One launch config: the kernel's BLOCK_* constexprs in its signature's order, warps, pipeline stages."""

    blocks: tuple[int, ...]
    num_warps: int = 4
    num_stages: int = 3  # Triton's default on CUDA


ENCODE: dict[str, Tile] = {
    # 64x128x64 / 8 warps: no spills (232 registers); at 4 warps the same tile spills 580 B per thread, and
    # 128x128x64 / 8 warps 776 B (static-20261203-k2.txt).
    "16-bit": Tile((64, 128, 64), num_warps=8),
    # fp32 operands (ieee products, no tensor cores): 872 B spills at this tile, the least of those built; not a
    # performance target.
    "fp32": Tile((64, 128, 64), num_warps=4),
}
"""(BLOCK_B, BLOCK_F, BLOCK_D) of `kernels.jumprelu_encode`, by the product's operand type."""

ROWS = Tile((32, 128))
"""(BLOCK_K, BLOCK_D) of `kernels.sparse_decode` (decode and gather-dot): 71-122 registers, no spills."""

PAIRS = Tile((32, 128))
"""(BLOCK_P, BLOCK_D) of `kernels.latent_grads` and `kernels.threshold_grad`: 96-254 registers, no spills."""


def encode_tile(operand_dtype: torch.dtype) -> Tile:
    """The encode's config for products in `operand_dtype` (`kernels.launch.operand_dtype`)."""
    return ENCODE["fp32" if operand_dtype == torch.float32 else "16-bit"]


def as_tile(blocks: tuple[int, ...] | Tile | None, default: Tile) -> Tile:
    """`default` when blocks is None; explicit block sizes (a tuple) launch with Triton's default warps and stages."""
    if blocks is None:
        return default
    return blocks if isinstance(blocks, Tile) else Tile(tuple(blocks))
