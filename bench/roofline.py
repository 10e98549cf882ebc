"""The device's two ceilings, measured by the suite at start-up, and each case's distance from them.

Matrix rate: a large square matrix product through torch (cuBLAS on CUDA: bf16 and fp32, 8192^3; the CPU:
fp32, 2048^3), 2 * n^3 FLOPs, on random data (zeros can run faster). Copy bandwidth: a device-to-device copy
of 1 GiB (CPU: 256 MiB, 64 MiB with --quick), counting the bytes read plus the bytes written. Both are the
best of the timed repetitions: ceilings, not typical values (a shared CPU's median sags under other load).
A case's floor is max(FLOPs / rate of its dtype, bytes / bandwidth): no implementation of its algorithm runs
much faster, and the roofline fraction is floor / measured time. The bf16 and fp16 cases (16-bit operands, fp32
accumulation) take the bf16 rate; where it is not measured (the CPU), the fp32 one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from bench.timing import Timer


class Roofline(NamedTuple):
    matmul_tflops: dict[str, float]  # by dtype name: "bf16", "fp32"
    copy_gbs: float
    matmul_n: int
    copy_bytes: int  # bytes read + written per copy

    def floor_s(self, flops: float, nbytes: float, dtype: str) -> tuple[float, str]:
        """(the time floor, "compute" or "memory": which ceiling sets it)."""
        if dtype == "fp16":  # the same tensor-core rate as bf16 on the GPUs here; bf16 is the one measured
            dtype = "bf16"
        rate = self.matmul_tflops.get(dtype) or self.matmul_tflops["fp32"]
        compute, memory = flops / (rate * 1e12), nbytes / (self.copy_gbs * 1e9)
        return (compute, "compute") if compute >= memory else (memory, "memory")


def measure(device: torch.device, quick: bool) -> Roofline:
    timer = Timer(device, repeat_s=0.5 if quick else 2.0)
    cuda = device.type == "cuda"
    n = 8192 if cuda else 2048
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32} if cuda else {"fp32": torch.float32}
    g = torch.Generator(device=device).manual_seed(0)
    rates = {name: _matmul_tflops(timer, n, dtype, g) for name, dtype in dtypes.items()}
    numel = (2**30 if cuda else (2**26 if quick else 2**28)) // 4
    src = torch.randn(numel, generator=g, device=device)
    dst = torch.empty_like(src)
    t = timer.time(lambda: dst.copy_(src))
    copy_bytes = 2 * numel * 4
    return Roofline(rates, copy_bytes / t.min_s / 1e9, n, copy_bytes)


def _matmul_tflops(timer: Timer, n: int, dtype: torch.dtype, g: torch.Generator) -> float:
    a = torch.randn(n, n, generator=g, device=timer.device).to(dtype)
    b = torch.randn(n, n, generator=g, device=timer.device).to(dtype)
    return 2 * n**3 / timer.time(lambda: torch.mm(a, b)).min_s / 1e12
