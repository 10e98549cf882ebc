"""Random token rows: a text-free row source for throughput measurements (a random-weight model costs what a
trained one does, and random tokens cost what real ones do). Same interface as harvest.text.TokenRows."""

from __future__ import annotations

import numpy as np


class RandomTokenRows:
    """Rows [BOS, random ids...] of exactly context_size tokens; row i depends only on (seed, i)."""

    def __init__(
        self,
        vocab_size: int,
        context_size: int,
        bos_token_id: int | None,
        seed: int = 0,
        special_ids: tuple[int, ...] = (),
    ):
        self.vocab_size, self.context_size, self.seed = vocab_size, context_size, seed
        self.prefix = [] if bos_token_id is None else [bos_token_id]
        avoid = np.array(sorted(set(special_ids) | set(self.prefix)), dtype=np.int64)
        self._allowed = np.setdiff1d(np.arange(vocab_size), avoid)  # ids a row may hold after its BOS
        self.num_examples = None
        self.index = 0

    def position(self) -> dict:
        return {"epoch": 0, "index": self.index}

    def seek(self, position: dict) -> None:
        self.index = int(position["index"])

    def take(self, n: int) -> list[tuple[list[int], dict]]:
        out = []
        for _ in range(n):
            rng = np.random.default_rng([self.seed, self.index])
            ids = self._allowed[rng.integers(0, len(self._allowed), self.context_size - len(self.prefix))]
            self.index += 1
            out.append((self.prefix + ids.tolist(), self.position()))
        return out

    def close(self) -> None:
        pass
