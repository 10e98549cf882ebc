"""Step-indexed schedules: learning rate (warm-up, linear decay at the end) and sparsity coefficient warm-up.

Pure functions of the step, so a resumed run needs nothing but the step to continue them exactly.
`step` counts from 0 for the first update.
"""

from __future__ import annotations


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, decay_fraction: float) -> float:
    """Linear warm-up over `warmup_steps`, constant, then linear decay to 0 over the last `decay_fraction`."""
    scale = 1.0
    if warmup_steps > 0:
        scale = min(scale, (step + 1) / warmup_steps)
    decay_steps = int(round(decay_fraction * total_steps))
    if decay_steps > 0:
        scale = min(scale, (total_steps - step) / decay_steps)
    return base_lr * max(scale, 0.0)


def sparsity_coefficient_at(step: int, coefficient: float, warmup_steps: int) -> float:
    """lambda rising linearly from 0 to `coefficient` over `warmup_steps`."""
    if warmup_steps <= 0:
        return coefficient
    return coefficient * min(1.0, step / warmup_steps)
