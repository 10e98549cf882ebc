"""A resumable synthetic activation source for trainer tests: sparse sums of fixed directions plus an offset.

Batch i depends only on (seed, i), so the stream is reproducible and its position is one integer.
"""

from __future__ import annotations

import torch


class SyntheticActivations:
    def __init__(
        self,
        d_in: int = 24,
        n_features: int = 64,
        batch_size: int = 64,
        seed: int = 0,
        active: int = 4,
        offset: float = 3.0,
        scale: float = 7.0,
    ):
        g = torch.Generator().manual_seed(seed)
        self.d_in, self.batch_size, self.seed, self.active, self.scale = d_in, batch_size, seed, active, scale
        directions = torch.randn(n_features, d_in, generator=g)
        self.directions = directions / directions.norm(dim=1, keepdim=True)
        self.offset = offset * torch.randn(d_in, generator=g)
        self.position = 0

    def batch(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        n = self.directions.shape[0]
        # Each token: `active` random features with positive magnitudes.
        idx = torch.rand(self.batch_size, n, generator=g).topk(self.active, dim=1).indices
        mags = torch.rand(self.batch_size, self.active, generator=g) + 0.5
        codes = torch.zeros(self.batch_size, n).scatter_(1, idx, mags)
        return self.scale * (codes @ self.directions) + self.offset

    def __iter__(self):
        while True:
            b = self.batch(self.position)
            self.position += 1
            yield b

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
