"""Fine-tuning: training starts from an existing SAE's weights exactly, whatever format they come in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kernels import reference as R
from sae.checkpoint import CheckpointError
from sae.config import ConfigError
from sae.trainer import Trainer
from tests.synthetic import SyntheticActivations
from tests.test_training import small_config


@pytest.fixture
def source_sae(tmp_path) -> dict[str, torch.Tensor]:
    """A trained SAE (raw-space weights) from a short run on other synthetic data."""
    summary = Trainer(
        small_config(tmp_path / "source", steps=15), SyntheticActivations(seed=5, scale=30.0), progress=False
    ).fit()
    return load_file(str(summary.checkpoint / "sae_weights.safetensors"))


def gemma_scope_npz(weights: dict[str, torch.Tensor], path) -> str:
    # Gemma Scope's decoder rows are not unit norm: stretch them, and shrink the encoder to match.
    g = torch.Generator().manual_seed(0)
    n = torch.rand(weights["W_dec"].shape[0], generator=g) + 0.5
    arrays = dict(
        weights,
        W_dec=weights["W_dec"] * n[:, None],
        W_enc=weights["W_enc"] / n,
        b_enc=weights["b_enc"] / n,
        threshold=weights["threshold"] / n,
    )
    np.savez(path, **{k: v.numpy() for k, v in arrays.items()})
    return str(path)


@pytest.mark.parametrize("form", ["run folder", "checkpoint folder", "params.npz"])
def test_first_step_reconstruction_equals_the_source_sae(tmp_path, source_sae, form):
    if form == "params.npz":
        init_from = gemma_scope_npz(source_sae, tmp_path / "params.npz")
    elif form == "run folder":
        init_from = str(tmp_path / "source")
    else:
        init_from = str(sorted((tmp_path / "source" / "checkpoints").glob("step_*"))[-1])
    cfg = small_config(tmp_path / "tuned", steps=3)
    cfg.sae.d_sae, cfg.sae.init_from = None, init_from
    source = SyntheticActivations(seed=1, scale=12.0)  # new data with another scale
    trainer = Trainer(cfg, source, progress=False)
    x = source.batch(0)
    expected = R.sae_forward(x, *(source_sae[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")), 0.001)
    with torch.no_grad():
        got = trainer.model(x * trainer.scale)
    scale = 1e-5 * x.abs().max()  # fp32 rounding of the rescaled weights, relative to the data's size
    torch.testing.assert_close(got.x_hat / trainer.scale, expected.x_hat, rtol=1e-5, atol=scale)
    torch.testing.assert_close(got.l0, expected.l0)
    norms = trainer.model.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    trainer.fit()
    first = json.loads((tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()[0])
    raw_mse = (x - expected.x_hat).pow(2).sum(-1).mean().item()
    assert first["mse"] == pytest.approx(raw_mse * trainer.scale**2, rel=1e-4)  # before any update


def test_init_from_a_mismatched_sae_is_refused(tmp_path, source_sae):
    np.savez(tmp_path / "bad.npz", **{k: v.numpy() for k, v in source_sae.items() if k != "threshold"})
    cfg = small_config(tmp_path / "a", steps=2)
    cfg.sae.init_from = str(tmp_path / "bad.npz")
    with pytest.raises(CheckpointError, match="lacks"):
        Trainer(cfg, SyntheticActivations(), progress=False)
    cfg = small_config(tmp_path / "b", steps=2)
    cfg.sae.init_from = str(tmp_path / "source")
    with pytest.raises(ConfigError, match="d_in"):
        Trainer(cfg, SyntheticActivations(d_in=20), progress=False)
    cfg = small_config(tmp_path / "c", steps=2)
    cfg.sae.init_from, cfg.sae.d_sae = str(tmp_path / "source"), 128
    with pytest.raises(ConfigError, match="d-sae"):
        Trainer(cfg, SyntheticActivations(), progress=False)
