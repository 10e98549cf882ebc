"""Activations that are not finite (NaN or infinite: a model overflowing in a 16-bit dtype, a broken layer):
counted, dropped token by token, and a harvest where they are common is stopped with a message."""

from __future__ import annotations

import torch

from .errors import HarvestError

MIN_TOKENS = 4096
"""Tokens harvested before the fraction of non-finite ones is judged (a single bad row must not stop a run)."""


class NonFiniteFilter:
    """Drops the tokens of acts [N, L, D] with any non-finite element, keeping counts across forward groups.

    max_fraction: stop (HarvestError) once more than this fraction of the tokens harvested so far (at least
    MIN_TOKENS) was dropped. dtype: the model's compute dtype, named in the message.
    """

    def __init__(self, max_fraction: float, dtype: torch.dtype | None = None):
        self.max_fraction, self.dtype = max_fraction, dtype
        self.tokens = 0  # harvested (after the special-token and outlier filters), dropped ones included
        self.dropped = 0

    def __call__(self, acts: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(acts).flatten(1).all(dim=1)  # [N]
        bad = int(finite.numel() - finite.sum())  # one host sync per forward group
        self.tokens += finite.numel()
        if not bad:
            return acts
        self.dropped += bad
        if self.tokens >= MIN_TOKENS and self.dropped > self.max_fraction * self.tokens:
            dtype = "" if self.dtype is None else f" in {str(self.dtype).removeprefix('torch.')}"
            raise HarvestError(
                f"{self.dropped:,} of {self.tokens:,} harvested activations ({self.dropped / self.tokens:.1%}) are NaN "
                f"or infinite, more than --max-nonfinite-fraction {self.max_fraction:g}: the language model is "
                f"probably overflowing{dtype} (run it in float32 or bfloat16 with --model-dtype), or the hooked "
                "layer is broken"
            )
        return acts[finite]

    def stats(self) -> dict[str, int]:
        return {"harvested_tokens": self.tokens, "nonfinite_dropped": self.dropped}
