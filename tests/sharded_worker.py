"""One rank of tests/test_sharded_step.py, started by torchrun: `python tests/sharded_worker.py MODE OUT_DIR`.

MODE "train": check the ranks' configs agree, train this rank's slice of the problem below with the sharded
dense step, gather the SAE, then check a deliberately different config; write everything to OUT_DIR/rank<r>.pt.
MODE "dies" / "stalls": the last rank leaves after the first collective / stops taking part in them (sleeps past
the timeout); the others' next collective must fail with `CollectiveError` (written to OUT_DIR/rank<r>.txt with
the seconds it took), at once when the peer's connection closes, within the timeout when it stays silent.

The test process runs the same problem on one process (`train_single`) as the oracle.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from sae.config import OptimConfig
from sae.distributed.layout import latent_slice
from sae.distributed.mesh import CollectiveError, Mesh, check_same_config
from sae.distributed.sharded import gather_sae, shard_sae
from sae.errors import ConfigError
from sae.model import JumpReLUSAE
from sae.objectives import Objective
from sae.steps import TrainStep
from sae.trainer import make_step

# d_sae 10 splits over 3 ranks as 4, 4, 2 (unequal shards), over 2 as 5, 5.
D_IN, D_SAE, B = 6, 10, 24
LR = 1e-2
OPTIM = OptimConfig(lr=LR, max_grad_norm=0.5)  # the gradient norm starts near 10: clipping is active
# One objective per step, so both sparsity terms and a tilted reconstruction are reduced alike on every rank.
OBJECTIVES = (
    Objective("target_l0", 1.0, 3.0),
    Objective("l0", 0.05, 3.0, tilt=0.5),
    Objective("target_l0", 1.0, 3.0, tilt=2.0),
    Objective("l0", 0.05, 3.0),
)
CONFIG = {"sae": {"d_in": D_IN, "d_sae": D_SAE}, "optim": {"lr": LR, "max_grad_norm": 0.5}}
TIMEOUT_S = {"dies": 10.0, "stalls": 3.0}  # short: "stalls" waits the whole of it


def make_problem() -> tuple[JumpReLUSAE, list[torch.Tensor]]:
    """The SAE (RECIPES init, thresholds in reach of the STE window, a non-zero b_dec) and one batch per step."""
    g = torch.Generator().manual_seed(0)
    model = JumpReLUSAE(D_IN, D_SAE, bandwidth=0.05)
    model.init_tied(0.05, g)
    with torch.no_grad():
        model.b_dec.copy_(0.1 * torch.randn(D_IN, generator=g))
    return model, [torch.randn(B, D_IN, generator=g) for _ in OBJECTIVES]


def train(step: TrainStep, xs: list[torch.Tensor], start: int = 0, mesh: Mesh | None = None) -> list[dict]:
    """Every step's figures; indices shifted by `start` to global latent ids; bytes sent per kind."""
    out = []
    for x, objective in zip(xs, OBJECTIVES, strict=True):
        before = Counter(mesh.sent) if mesh else Counter()
        r = step(x, LR, objective)
        sent = dict(mesh.sent - before) if mesh else {}
        figures = {k: getattr(r, k) for k in ("loss", "reconstruction", "mse", "l0", "explained_variance")}
        active = [set((r.indices[b][r.values[b] > 0] + start).tolist()) for b in range(x.shape[0])]
        out.append({**figures, "grad_norm": r.grad_norm, "active": active, "sent": sent,
                    "communicated_bytes": r.communicated_bytes})  # fmt: skip
    return out


def train_single() -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The oracle: the same problem on one process with today's step (no mesh)."""
    model, xs = make_problem()
    steps = train(make_step(model, "reference", OPTIM), xs)
    return steps, {name: p.detach().clone() for name, p in model.named_parameters()}


def main_train(mesh: Mesh, out: Path) -> None:
    check_same_config(mesh, CONFIG)  # the same everywhere: passes
    model, xs = make_problem()
    part = latent_slice(D_SAE, mesh.world, mesh.rank)
    local = shard_sae(model, part)
    steps = train(make_step(local, "reference", OPTIM, mesh), xs, part.start, mesh)
    result = {"steps": steps, "params": gather_sae(local, mesh, D_SAE), "b_dec": local.b_dec.detach().clone()}
    different = {**CONFIG, "sae": {"d_in": D_IN, "d_sae": D_SAE + 2 if mesh.rank == 1 else D_SAE}}
    try:
        check_same_config(mesh, different)
        result["mismatch"] = None
    except ConfigError as error:
        result["mismatch"] = str(error)
    torch.save(result, out / f"rank{mesh.rank}.pt")


def main_lost_rank(mesh: Mesh, out: Path, stalls: bool) -> None:
    mesh.all_reduce_sum_(torch.ones(1), "hello")
    if mesh.rank == mesh.world - 1:
        if stalls:  # a hung rank (torchrun stops it once another rank fails)
            time.sleep(mesh.timeout_s + 30)
        os._exit(0)  # leaves without a word, as a killed rank would (exit status 0: torchrun keeps the others)
    start = time.monotonic()
    try:
        mesh.all_reduce_sum_(torch.ones(1), "after")
    except CollectiveError as error:
        (out / f"rank{mesh.rank}.txt").write_text(f"{time.monotonic() - start:.2f}\n{error}")
        raise


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    mesh = Mesh.from_env(timeout_s=TIMEOUT_S.get(mode, 60.0))
    if mode == "train":
        main_train(mesh, out_dir)
    else:
        main_lost_rank(mesh, out_dir, stalls=mode == "stalls")
    mesh.close()
