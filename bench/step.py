"""Timing of one SAE training step (forward, backward, Adam) of the reference path.

FLOPs of the dense step, B tokens, D d_in, F d_sae: the encoder and decoder products in the forward
(2 * 2BDF) and four products in the backward (dW_dec, dL/df, dW_enc, and dL/d(x - b_dec) for b_dec's
gradient): 12 * B * D * F in all.
"""

from __future__ import annotations

import statistics
import time
from typing import NamedTuple

import torch

from sae.model import JumpReLUSAE
from sae.objectives import sae_loss


class StepTiming(NamedTuple):
    batch: int
    d_in: int
    d_sae: int
    device: str
    median_s: float
    spread_s: float  # interquartile range
    tokens_per_s: float
    tflops: float


def dense_step_flops(batch: int, d_in: int, d_sae: int) -> int:
    return 12 * batch * d_in * d_sae


def time_reference_step(batch: int, d_in: int, d_sae: int, device: torch.device, repeats: int) -> StepTiming:
    model = JumpReLUSAE(d_in, d_sae).to(device)
    model.init_tied(threshold=0.5, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.0, 0.999))
    x = torch.randn(batch, d_in, device=device)

    def step() -> None:
        out = model(x)
        loss = sae_loss(x, out.x_hat, out.l0, "target_l0", 1.0, 32.0)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        model.project_decoder_grad()
        optimizer.step()
        model.normalize_decoder()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):  # warm-up: allocator, kernels, Adam state
        step()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    median = statistics.median(times)
    return StepTiming(
        batch, d_in, d_sae, str(device), median, q[2] - q[0], batch / median,
        dense_step_flops(batch, d_in, d_sae) / median / 1e12,
    )
