"""The latent split of sae/distributed/layout.py is torch.chunk's (what DTensor's Shard places), or refused."""

import pytest
import torch

from sae.distributed.layout import check_splittable, latent_slice
from sae.errors import ConfigError


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 7])
def test_slices_are_torch_chunks_or_refused(world):
    for d_sae in range(1, 40):
        chunks = torch.arange(d_sae).chunk(world)
        if len(chunks) == world and all(len(c) for c in chunks):
            slices = [latent_slice(d_sae, world, r) for r in range(world)]
            assert [list(range(s.start, s.stop)) for s in slices] == [c.tolist() for c in chunks]
            assert sum(s.size for s in slices) == d_sae
        else:
            with pytest.raises(ConfigError, match=f"cannot be split over {world} ranks"):
                check_splittable(d_sae, world)


def test_unequal_shards_and_bad_rank():
    assert [latent_slice(10, 3, r).size for r in range(3)] == [4, 4, 2]
    with pytest.raises(ConfigError, match="outside a world of 3"):
        latent_slice(10, 3, 3)
    with pytest.raises(ConfigError, match="at least 1"):
        check_splittable(10, 0)
