"""The SAE workloads the bench measures: shapes, their names, and the operand dtype labels.

Below every other bench module: the cases, the registry, the synthetic data and the runner all read it.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

BenchDtype = Literal["fp32", "bf16", "fp16"]
"""Short name of a case's product operand dtype, as in its impl suffix (`-bf16`) and the report."""


class Shape(NamedTuple):
    """An SAE workload: B tokens, D d_in, F d_sae, K target L0 per row, eps the STE bandwidth."""

    B: int
    D: int
    F: int
    K: int
    eps: float

    def describe(self) -> str:
        return f"B={self.B} D={self.D} F={self.F}"


# Named SAE sizes. Gemma-2-2B's residual width at the widths Gemma Scope released; "offline" is the CPU
# default run (harvest/config.py, sae/config.py: d_in 640, expansion 4, batch 1024, target L0 32); "tiny" is
# for tests and explicit selection only.
SAE_SIZES: dict[str, Shape] = {
    "tiny": Shape(256, 64, 512, 8, 0.02),
    "offline": Shape(1024, 640, 2560, 32, 0.001),
    "16k": Shape(4096, 2304, 16384, 64, 0.001),
    "65k": Shape(4096, 2304, 65536, 64, 0.001),
    "262k": Shape(4096, 2304, 262144, 64, 0.001),
    "1m": Shape(4096, 2304, 1048576, 64, 0.001),
}
# Kernels in Triton's CPU interpreter cost ~70 us per operation per program: they are checked at this shape
# (odd sizes, a wide window so the threshold path sees pairs), whatever the case's size.
INTERPRETER_SHAPE = Shape(48, 40, 300, 6, 0.05)
HARVEST_SIZES = ("tiny", "offline", "gemma2-2b")
