"""One rank of tests/test_sharded_training.py, started by torchrun:
`python tests/sharded_trainer_worker.py OUT_DIR STEPS [RESUME] [KILL_AT_STEP]`.

Trains the Trainer of `config(OUT_DIR, STEPS)` with its latents split over the ranks, every rank fed the same
synthetic global batches (what GatheredBatches delivers from a harvest), and writes each step's figures to
OUT_DIR/losses_rank<r>.json. RESUME: continue from that checkpoint. KILL_AT_STEP: the last rank kills itself
with SIGKILL right after that step (a crash: no checkpoint, no goodbye); torchrun then stops the others.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from sae.config import ObjectiveConfig, OptimConfig, RunConfig, SAEConfig, TrainConfig
from sae.distributed import checkpoint as sharded_checkpoint
from sae.distributed.mesh import Mesh
from sae.trainer import Trainer
from tests.synthetic import SyntheticActivations

# d_sae 10 splits over 3 ranks as 4, 4, 2 (unequal shards), over 2 as 5, 5.
D_IN, D_SAE, BATCH = 8, 10, 32


class GlobalBatches(SyntheticActivations):
    """The same global batches on every rank; continues from its own position or a data-parallel one (every
    rank's position is the same here, as with GatheredBatches over harvesters on the same world)."""

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state["ranks"][0] if "ranks" in state else state)


def config(out_dir: str | Path, steps: int) -> TrainConfig:
    return TrainConfig(
        sae=SAEConfig(d_sae=D_SAE, init_l0=3.0, backend="reference"),
        objective=ObjectiveConfig(sparsity="target_l0", target_l0=3.0, sparsity_warmup_steps=2),
        optim=OptimConfig(lr=1e-2, lr_warmup_steps=1, batch_size=BATCH, adam_beta1=0.9, max_grad_norm=0.5),
        run=RunConfig(
            steps=steps,
            out_dir=str(out_dir),
            device="cpu",
            log_every=1,
            checkpoint_every=3,
            keep_checkpoints=5,
            init_batches=2,
            collective_timeout_s=60,
        ),  # fmt: skip
    )


def source() -> GlobalBatches:
    return GlobalBatches(d_in=D_IN, n_features=16, batch_size=BATCH, seed=3, active=2)


def step_figures(trainer: Trainer) -> dict:
    r = trainer.last_logged
    return {k: r[k] for k in ("step", "loss", "mse", "l0", "explained_variance", "grad_norm", "dead_fraction")}


def main() -> None:
    out_dir, steps = Path(sys.argv[1]), int(sys.argv[2])
    resume = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
    sharded_checkpoint._EXPORT_BLOCK_BYTES = 3 * 4 * D_IN  # the export streams W_enc, W_dec in blocks of 3 rows
    mesh = Mesh.from_env(timeout_s=60)
    trainer = Trainer(config(out_dir, steps), source(), resume=resume, progress=False, mesh=mesh)
    figures = []
    while not trainer.done:
        trainer.fit_step()
        figures.append(step_figures(trainer))
        if kill_at is not None and trainer.step == kill_at and mesh.rank == mesh.world - 1:
            os.kill(os.getpid(), signal.SIGKILL)
    (out_dir / f"losses_rank{mesh.rank}.json").write_text(json.dumps(figures))
    mesh.close()


if __name__ == "__main__":
    main()
