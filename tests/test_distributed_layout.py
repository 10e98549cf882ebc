"""The latent split of sae/distributed/layout.py is torch.chunk's (what DTensor's Shard places), or refused; a
rank's slice initialises to its rows of the whole SAE's init."""

import pytest
import torch

import sae.model as model_module
from sae.distributed.layout import check_splittable, latent_slice
from sae.errors import ConfigError
from sae.model import JumpReLUSAE


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


@pytest.mark.parametrize("world", [2, 3])
def test_each_ranks_init_equals_its_rows_of_the_whole_saes_init(world, monkeypatch):
    """init_tied(first_latent=...) on each slice, with the blocks of skipped rows made tiny so several are drawn,
    equals the single-process init restricted to the slice, and so do the L0-targeted thresholds."""
    monkeypatch.setattr(model_module, "_INIT_BLOCK_ELEMENTS", 7 * 3)  # 3 rows of d_in = 7 per skipped block
    d_in, d_sae = 7, 50
    whole = JumpReLUSAE(d_in, d_sae, 0.05, "reference")
    whole.init_tied(0.2, torch.Generator().manual_seed(5))
    x = torch.randn(64, d_in, generator=torch.Generator().manual_seed(6))
    whole.init_thresholds_for_l0(x, 4.0, floor=1e-6)
    for rank in range(world):
        sl = latent_slice(d_sae, world, rank)
        part = JumpReLUSAE(d_in, sl.size, 0.05, "reference")
        part.init_tied(0.2, torch.Generator().manual_seed(5), first_latent=sl.start)
        part.init_thresholds_for_l0(x, 4.0, floor=1e-6, total_latents=d_sae)
        assert torch.equal(part.W_dec, whole.W_dec[sl.start : sl.stop])
        assert torch.equal(part.W_enc, whole.W_enc[:, sl.start : sl.stop])
        assert torch.equal(part.threshold, whole.threshold[sl.start : sl.stop])
