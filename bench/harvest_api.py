"""Every call the bench makes into the harvester and the trainer, in one place.

The harvester's API is being reworked; the bench relies only on what is used here: the `Harvester`
constructor iterated for [B, D] batches, `layer_activations`, `load_lm` for the offline default model, and
`Trainer.train_step`, and `Harvester.close` where it exists (the reworked harvester harvests and tokenises
ahead in background threads). Adapt this module when those change.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from harvest import BufferConfig, DataConfig, Harvester, ModelConfig, load_lm
from harvest.activations import layer_activations


class Batches:
    """The harvester's stream of float32 activation batches [batch_size, d_in] on `device`; `close` stops its
    background threads (harvesting ahead, tokenising ahead)."""

    def __init__(self, model: nn.Module, tokenizer, model_cfg: ModelConfig, data_cfg: DataConfig,
                 buffer_cfg: BufferConfig, batch_size: int, device: torch.device):
        self.harvester = Harvester(model_cfg, data_cfg, buffer_cfg, batch_size=batch_size, device=device,
                                   lm=(model, tokenizer), progress=False)
        self._batches: Iterator[Tensor] = iter(self.harvester)

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        return next(self._batches)

    def close(self) -> None:
        self._batches.close()  # the generator's own clean-up stops its producer
        close = getattr(self.harvester, "close", None)
        if close is not None:
            close()


def bare_forward(model: nn.Module, layer: int, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The truncated forward alone: decoder layer `layer`'s output [R, T, D]."""
    return layer_activations(model, layer, input_ids, attention_mask)


def offline_default() -> tuple[nn.Module, object, ModelConfig, DataConfig]:
    """The offline default model (Gemma-3 270M) and the configs' defaults, as `python -m sae` uses them."""
    model_cfg, data_cfg = ModelConfig(), DataConfig()
    model, tokenizer = load_lm(model_cfg)
    return model, tokenizer, model_cfg, data_cfg


class TrainerFeed:
    """A `sae.trainer.Trainer` (sparse step on CUDA, dense elsewhere) fed harvested batches by `step`.

    Built on one batch (activation scale, b_dec mean, thresholds for an initial L0 of `init_l0`); writes its
    run files to a temporary folder removed by `close`.
    """

    def __init__(self, first: Tensor, model_cfg: ModelConfig, data_cfg: DataConfig, buffer_cfg: BufferConfig,
                 d_sae: int, target_l0: float, device: torch.device, backend: str):
        from sae.config import (
            ObjectiveConfig,
            OptimConfig,
            RunConfig,
            SAEConfig,
            TrainConfig,
        )
        from sae.trainer import Trainer

        self._dir = tempfile.TemporaryDirectory(prefix="saekit-bench-")
        cfg = TrainConfig(
            model=model_cfg, data=data_cfg, buffer=buffer_cfg,
            sae=SAEConfig(d_sae=d_sae, init_l0=target_l0, backend=backend),
            objective=ObjectiveConfig(target_l0=target_l0, sparsity_warmup_steps=0),
            optim=OptimConfig(batch_size=first.shape[0], lr=1e-4, lr_warmup_steps=0),
            run=RunConfig(steps=10**9, out_dir=self._dir.name, device=str(device), init_batches=1,
                          log_every=10**9, checkpoint_every=10**9),
        )  # fmt: skip
        self.trainer = Trainer(cfg, [first], progress=False)

    def step(self, x: Tensor):
        """One `Trainer.train_step` on a raw batch, scaled as `Trainer.fit` scales it."""
        t = self.trainer
        return t.train_step(x.to(t.device, torch.float32) * t.scale)

    def close(self) -> None:
        self._dir.cleanup()
