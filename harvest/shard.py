"""Which share of the data one rank harvests under data parallelism, and its share of each global batch.

The token stream is cut into forward groups (harvest/forward.py) exactly as one process would cut it; the
groups are dealt in rounds of `world`: rank r runs the language model on the r-th group of every round and
only reads past the others' rows (tokenising them, no forward). So the groups of all ranks together are the
single-process groups, each harvested by exactly one rank, and every rank's activations are bit for bit
those a single process would compute for the same group.

Each rank then buffers and shuffles its own groups' tokens in its own ring and delivers batches of
B / world tokens; harvest/gather.py all-gathers them into the global batch [B, D] in rank order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import HarvestError


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `world` data-parallel harvesters; Shard(0, 1) harvests everything (one process)."""

    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.world < 1:
            raise HarvestError(f"world={self.world}: a data-parallel harvest needs at least one rank")
        if not 0 <= self.rank < self.world:
            raise HarvestError(f"rank={self.rank} lies outside a world of {self.world} ranks (0 to {self.world - 1})")

    @classmethod
    def from_env(cls) -> Shard:
        """The shard torchrun gives this process (its RANK and WORLD_SIZE); Shard(0, 1) outside torchrun."""
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if rank is None and world is None:
            return cls()
        if rank is None or world is None:
            raise HarvestError(
                f"the environment sets {'WORLD_SIZE' if rank is None else 'RANK'} but not "
                f"{'RANK' if rank is None else 'WORLD_SIZE'}: launch with torchrun (which sets both), or pass "
                "the harvester an explicit Shard(rank, world)"
            )
        try:
            return cls(int(rank), int(world))
        except ValueError:
            raise HarvestError(
                f"RANK={rank!r} and WORLD_SIZE={world!r} must be integers (torchrun sets them)"
            ) from None

    def local_batch_size(self, batch_size: int) -> int:
        """This rank's share of a global batch of `batch_size` tokens: every rank delivers the same number, so
        the gathered batch is balanced and the rank order alone says where each token came from."""
        if batch_size < self.world or batch_size % self.world:
            below, above = batch_size // self.world * self.world, -(-batch_size // self.world) * self.world
            choices = f"{below} or {above}" if below else f"{above}"
            raise HarvestError(
                f"batch_size={batch_size} does not split evenly over {self.world} data-parallel ranks: pass a "
                f"multiple of {self.world} ({choices})"
            )
        return batch_size // self.world

    def owns(self, group: int) -> bool:
        """Whether this rank harvests forward group `group` (0-based, counted from where its reader started)."""
        return group % self.world == self.rank
