"""Which latents each rank owns: one contiguous slice per rank, split as `torch.chunk` splits (and as
`torch.distributed.tensor.Shard` places a dimension), so a DTensor built from the local slices has exactly this
layout and torch.distributed.checkpoint can reshard it onto any other number of ranks.

The latent-indexed parameters and their optimizer moments are split along their latent dimension; b_dec (and
every scalar, such as Adam's step) is replicated on every rank.
"""

from __future__ import annotations

from typing import NamedTuple

from sae.errors import ConfigError

# Parameter name -> the dimension of its latents (W_enc [D, F], b_enc [F], threshold [F], W_dec [F, D]).
LATENT_DIM: dict[str, int] = {"W_enc": 1, "b_enc": 0, "threshold": 0, "W_dec": 0}
REPLICATED: tuple[str, ...] = ("b_dec",)


class LatentSlice(NamedTuple):
    """Rank `rank` of `world` owns the global latents [start, stop) of `d_sae`."""

    rank: int
    world: int
    d_sae: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def check_splittable(d_sae: int, world: int) -> None:
    """Refuse a world size that leaves a rank without latents (torch.chunk gives ceil(F / W) per rank)."""
    if world < 1:
        raise ConfigError(f"the world size must be at least 1, got {world}")
    per_rank = -(-d_sae // world)
    if d_sae < world or per_rank * (world - 1) >= d_sae:
        raise ConfigError(
            f"d_sae {d_sae} cannot be split over {world} ranks: contiguous slices of ceil({d_sae} / {world}) = "
            f"{per_rank} latents leave the last rank(s) with none; use a d_sae that is a multiple of {world} "
            f"(e.g. {world * per_rank}) or fewer ranks"
        )


def latent_slice(d_sae: int, world: int, rank: int) -> LatentSlice:
    """The slice rank `rank` owns: ceil(d_sae / world) latents per rank, the last rank(s) fewer (torch.chunk)."""
    check_splittable(d_sae, world)
    if not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is outside a world of {world} ranks")
    per_rank = -(-d_sae // world)
    start = min(rank * per_rank, d_sae)
    return LatentSlice(rank, world, d_sae, start, min(start + per_rank, d_sae))
