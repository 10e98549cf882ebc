"""A training run's folder: everything the trainer writes to disk, in one place.

    <out_dir>/run_config.json     the full TrainConfig of the run (rewritten on resume)
    <out_dir>/metrics.jsonl       one JSON line per log interval (truncated to the checkpoint on resume)
    <out_dir>/checkpoints/        see sae/checkpoint.py

A `Trainer` built with `write=False` has no run folder and touches no file (the bench and tests drive the
same training code that way).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from sae import checkpoint as ckpt

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "run_config.json"


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def refuse_existing_run(self) -> None:
        """A new run must not overwrite the checkpoints of another one."""
        if ckpt.has_checkpoints(self.path):
            raise ckpt.CheckpointError(
                f"{self.path} already holds a run; continue it with --resume {self.path} or pick another --out-dir"
            )

    def start(self, config: dict[str, Any], resumed_step: int | None) -> None:
        """Write run_config.json; a new run starts an empty metrics log, a resumed one drops the lines logged
        after its checkpoint so that the log reads as one run."""
        self.path.mkdir(parents=True, exist_ok=True)
        metrics = self.path / METRICS_FILE
        if resumed_step is None:
            metrics.write_text("")
        elif metrics.exists():
            lines = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] <= resumed_step]
            metrics.write_text("".join(ln + "\n" for ln in lines))
        (self.path / RUN_CONFIG_FILE).write_text(json.dumps(config, indent=2))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def save_checkpoint(
        self, step: int, sae_weights: dict[str, Tensor], sae_cfg: dict[str, Any], state_info: dict[str, Any],
        state_tensors: dict[str, Tensor], keep: int,
    ) -> Path:  # fmt: skip
        return ckpt.write_checkpoint(
            self.path / "checkpoints", step, sae_weights, sae_cfg, state_info, state_tensors, keep
        )

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint; None before the first."""
        return ckpt.find_checkpoint(self.path) if ckpt.has_checkpoints(self.path) else None
