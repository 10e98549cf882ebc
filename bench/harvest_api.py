"""Every call the bench makes into the harvester and the trainer, in one place.

The harvester's API is being reworked; the bench relies only on what is used here: the `Harvester`
constructor iterated for [B, D] batches, `layer_activations`, `load_lm` for the offline default model, and
`Trainer.train_step`, `sae.sweep.Sweep` (its `step`, members and trainers), and `Harvester.close` where it
exists (the reworked harvester harvests and tokenises ahead in background threads). Adapt this module when those
change.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from harvest import BufferConfig, DataConfig, Harvester, ModelConfig, load_lm
from harvest.activations import layer_activations


class Batches:
    """The harvester's stream of float32 activation batches [batch_size, d_in] on `device`; `close` stops its
    background threads (harvesting ahead, tokenising ahead)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        model_cfg: ModelConfig,
        data_cfg: DataConfig,
        buffer_cfg: BufferConfig,
        batch_size: int,
        device: torch.device,
    ):
        self.harvester = Harvester(
            model_cfg, data_cfg, buffer_cfg, batch_size=batch_size, device=device, lm=(model, tokenizer), progress=False
        )
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
    """A `sae.trainer.Trainer` (sparse step on CUDA, dense elsewhere) drawing its batches from `source`, one
    `Trainer.fit_step` per `step()`: the loop `python -m sae train` runs, without its run folder (`write=False`:
    nothing is written to disk).

    Initialised on the source's first batch (activation scale, b_dec mean, thresholds for an initial L0 of
    `target_l0`), which its first step then trains on, as a run does.
    """

    def __init__(
        self,
        source: Iterable[Tensor],
        model_cfg: ModelConfig,
        data_cfg: DataConfig,
        buffer_cfg: BufferConfig,
        batch_size: int,
        d_sae: int,
        target_l0: float,
        device: torch.device,
        backend: str,
    ):
        from sae.config import (
            ObjectiveConfig,
            OptimConfig,
            RunConfig,
            SAEConfig,
            TrainConfig,
        )
        from sae.trainer import Trainer

        cfg = TrainConfig(
            model=model_cfg, data=data_cfg, buffer=buffer_cfg,
            sae=SAEConfig(d_sae=d_sae, init_l0=target_l0, backend=backend),
            objective=ObjectiveConfig(target_l0=target_l0, sparsity_warmup_steps=0),
            optim=OptimConfig(batch_size=batch_size, lr=1e-4, lr_warmup_steps=0),
            run=RunConfig(steps=10**9, device=str(device), init_batches=1,
                          log_every=10**9, checkpoint_every=10**9),
        )  # fmt: skip
        self.trainer = Trainer(cfg, source, progress=False, write=False)

    def step(self):
        """One `Trainer.fit_step`: the next batch, scaled, trained on; its `StepStats`."""
        return self.trainer.fit_step()


class SweepFeed:
    """`sae.sweep.Sweep` over `grid` (e.g. {"d_sae": [...], "target_l0": [...]}): one harvest of random token rows
    (full rows of `data_cfg.context_size`, BOS first: no text, no `datasets`) through the given model, fanned out
    to one Trainer per member (sparse step on CUDA, dense elsewhere), `write=False`: nothing written to disk.
    One `Sweep.step` per `step()`.

    The Salmon recipe's objective (target L0, coefficient 1, no sparsity warm-up here) and learning rate (3e-4,
    no warm-up); every member starts at an L0 of about `init_l0` (calibrated on the first batch).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        model_cfg: ModelConfig,
        data_cfg: DataConfig,
        buffer_cfg: BufferConfig,
        batch_size: int,
        grid: dict[str, list],
        init_l0: float,
        device: torch.device,
        backend: str,
    ):
        from harvest.random_rows import RandomTokenRows
        from sae.config import ObjectiveConfig, OptimConfig, RunConfig, SAEConfig, TrainConfig
        from sae.sweep import Sweep

        base = TrainConfig(
            model=model_cfg, data=data_cfg, buffer=buffer_cfg,
            sae=SAEConfig(d_sae=max(grid["d_sae"]), init_l0=init_l0, backend=backend),
            objective=ObjectiveConfig(sparsity="target_l0", l0_coefficient=1.0, target_l0=min(grid["target_l0"]),
                                      sparsity_warmup_steps=0),
            optim=OptimConfig(batch_size=batch_size, lr=3e-4, lr_warmup_steps=0),
            run=RunConfig(steps=10**9, device=str(device), init_batches=1, log_every=10**9,
                          checkpoint_every=10**9, out_dir="bench-sweep"),
        )  # fmt: skip
        rows = RandomTokenRows(
            len(tokenizer),
            data_cfg.context_size,
            tokenizer.bos_token_id,
            special_ids=tuple(tokenizer.all_special_ids),
        )
        self.sweep = Sweep(base, grid, progress=False, lm=(model, tokenizer), rows=rows, write=False)

    @property
    def members(self) -> list[tuple[str, object]]:
        """(name, TrainConfig) of every member."""
        return self.sweep.members

    @property
    def trainers(self) -> list:
        return self.sweep.trainers

    def step(self) -> dict:
        """One `Sweep.step`: {member index: its StepStats} (members that stopped are missing)."""
        return self.sweep.step()

    def close(self) -> None:
        self.sweep.harvester.close()
