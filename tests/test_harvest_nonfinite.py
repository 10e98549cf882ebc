"""Non-finite activations are dropped and counted, and a flood of them stops the harvest."""

from __future__ import annotations

import json

import pytest
import torch

from harvest import HarvestError, forward, nonfinite
from harvest.nonfinite import MIN_TOKENS, NonFiniteFilter
from tests.test_train_live import harvester, live_config


def test_the_filter_drops_only_tokens_with_a_non_finite_value_and_counts_them():
    acts = torch.randn(10, 2, 8)
    acts[3, 1, 4] = float("nan")
    acts[7, 0, 0] = float("inf")
    keep = NonFiniteFilter(0.5)
    out = keep(acts)
    assert torch.equal(out, acts[[0, 1, 2, 4, 5, 6, 8, 9]])
    assert keep.stats() == {"harvested_tokens": 10, "nonfinite_dropped": 2}
    clean = torch.randn(5, 1, 8)
    assert keep(clean) is clean  # nothing to drop: the same tensor, untouched


def test_a_flood_stops_only_after_enough_tokens_and_names_the_dtype():
    keep = NonFiniteFilter(0.01, torch.float16)
    bad = torch.full((100, 1, 4), float("nan"))
    keep(bad)  # 100 tokens: too few to judge
    with pytest.raises(HarvestError, match=r"NaN or infinite.*overflowing in float16.*--model-dtype"):
        for _ in range(MIN_TOKENS // 100):
            keep(bad)


def planted(monkeypatch, every: int, tokens: int = 1):
    """Make every `every`-th forward group's first `tokens` activations NaN."""
    real = forward.layer_activations
    calls = []

    def poisoned(model, layers, *args):
        acts = real(model, layers, *args)
        calls.append(1)
        if len(calls) % every == 0:
            acts = acts.clone()
            acts[0, :tokens] = float("nan")  # row 0: its first tokens (BOS at 0 is excluded later anyway)
        return acts

    monkeypatch.setattr(forward, "layer_activations", poisoned)


def test_planted_non_finite_activations_are_dropped_and_counted_in_the_metrics(
    tiny_model, text_file, tmp_path, monkeypatch
):
    from sae.trainer import Trainer
    from tests.test_train_live import losses

    planted(monkeypatch, every=2, tokens=4)
    cfg = live_config(tiny_model, text_file, tmp_path / "run")
    source = harvester(cfg)
    Trainer(cfg, source, progress=False).fit()
    counts = source.stats()
    assert 0 < counts["nonfinite_dropped"] < counts["harvested_tokens"]
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses(tmp_path / "run"))
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < last["nonfinite_dropped"] <= counts["nonfinite_dropped"]  # the producer harvests ahead of the log


def test_a_flood_of_non_finite_activations_stops_the_run(tiny_model, text_file, tmp_path, monkeypatch):
    from sae.trainer import Trainer

    planted(monkeypatch, every=1, tokens=10_000)  # every token of row 0 of every group
    monkeypatch.setattr(nonfinite, "MIN_TOKENS", 64)  # the tiny run harvests a few hundred tokens
    cfg = live_config(tiny_model, text_file, tmp_path / "run")
    cfg.model.max_nonfinite_fraction = 0.001
    with pytest.raises(HarvestError, match="NaN or infinite"):
        Trainer(cfg, harvester(cfg), progress=False).fit()
