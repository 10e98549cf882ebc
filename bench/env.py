"""What every benchmark case sees (`Env`) and what it hands the runner to time (`Workload`)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

import torch

from bench.roofline import Roofline
from bench.shapes import INTERPRETER_SHAPE, BenchDtype, Shape
from bench.timing import Timer

KernelMode = Literal["compiled", "interpreted", "unavailable"]
"""How the Triton cases run: compiled on CUDA, in Triton's CPU interpreter (checked, not timed), or not at all."""


class Workload(NamedTuple):
    """What `Case.prepare` returns: the callable to time and its counts (bench/counts.py)."""

    fn: Callable[[], object]
    flops: float
    nbytes: float
    tokens: int  # tokens processed per call
    dtype: BenchDtype = "fp32"  # which matrix-rate ceiling applies: "fp32", "bf16" or "fp16" (bf16's rate)
    note: str = ""
    min_warmup: int = 1  # torch.compile recompiles on its second call: use 2 or more there
    extra: dict[str, Any] | None = None  # figures for the JSON (mean L0, reruns, ...)
    wall_clock: bool = False  # work on other streams or threads (the harvester): time with a device-wide sync
    cleanup: Callable[[], None] | None = None  # called after timing (stops background threads)
    derived: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # more figures from the timed record


@dataclass
class Env:
    """What every case sees: the device, the kernel mode, the timer and a cache of shared inputs."""

    device: torch.device
    quick: bool
    kernels: KernelMode
    kernels_reason: str
    timer: Timer
    roofline: Roofline | None = None
    deadline: float | None = None  # time.time() after which no case starts
    cache: dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kernels not in get_args(KernelMode):
            raise ValueError(f"kernels={self.kernels!r} is not one of {get_args(KernelMode)}")

    def check_shape(self, shape: Shape, triton: bool) -> Shape:
        """Kernels in the interpreter are checked at INTERPRETER_SHAPE, everything else at its own shape."""
        return INTERPRETER_SHAPE if triton and self.kernels == "interpreted" else shape

    def shared(self, key: Any, build: Callable[[], Any]) -> Any:
        """Inputs shared by the cases of one size, built once. Only one such entry is kept (besides the small
        interpreter-shape data): cases run size by size, and a 2^20-latent SAE holds 19 GB."""
        if key not in self.cache:
            for old in [k for k in self.cache if k != ("sae", INTERPRETER_SHAPE)]:
                del self.cache[old]
            release(self.device)
            self.cache[key] = build()
        return self.cache[key]

    def sae_data(self, shape: Shape):
        """Synthetic SAE inputs for `shape` (bench/synthetic.py)."""
        from bench.synthetic import check_rows_for, make_sae_data

        rows = check_rows_for(shape, self.device)
        return self.shared(("sae", shape), lambda: make_sae_data(shape, self.device, rows))


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
