"""The training loop: short named steps around one `train_step`.

The trainer consumes any iterable of activation batches [B, D] (see `sae.batches`); it does not know where
they come from. It trains on scale * x with scale fixed from the first batches so that E||x||^2 = d_in,
and saves checkpoints whose SAE acts on raw x.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae import checkpoint as ckpt
from sae.batches import BatchStream
from sae.config import OptimConfig, TrainConfig
from sae.dense_step import DenseStep
from sae.distributed.layout import LATENT_DIM, LatentSlice, latent_slice
from sae.distributed.mesh import Mesh, check_same_config
from sae.errors import ConfigError
from sae.health import LossWatch, NonFiniteStep, TrainingHealthError, non_finite_parameters, stop_message
from sae.model import PARAM_NAMES, THRESHOLD_FLOOR, JumpReLUSAE
from sae.objectives import Objective
from sae.ops import resolve_compute
from sae.pretrained import load_pretrained
from sae.run_folder import RunFolder
from sae.schedule import lr_at, sparsity_coefficient_at
from sae.sparse_step import SparseStep
from sae.steps import TrainStep

# Sections that fix the data stream or the SAE's shape: a resumed run must keep them, except where the
# computation runs (a CPU run may continue on a GPU).
_FROZEN_SECTIONS = ("model", "data", "buffer", "sae")
_MOVABLE_FIELDS = ("model_device", "backend", "compute_dtype")  # checkpoints hold fp32 masters only


class StepStats(NamedTuple):
    loss: float
    reconstruction: float  # as optimised: tilted when --tilt > 0
    mse: float  # plain mean squared error summed over d_in, comparable across tilts
    sparsity: float
    l0: float
    explained_variance: float
    grad_norm: float
    lr: float
    sparsity_coefficient: float
    encode_reruns: float  # 1 when a row overflowed the fused encode's capacity and it ran again (triton only)
    communicated_bytes: float = 0.0  # payload this rank's collectives moved in the step (latent-sharded runs)


class TrainSummary(NamedTuple):
    checkpoint: Path | None  # None before the first checkpoint, or for a Trainer built with write=False
    step: int
    tokens: int
    l0: float
    explained_variance: float
    dead_fraction: float
    dead_window_tokens: int


def uses_sparse_step(backend: str, optim: OptimConfig) -> bool:
    """The sparse step needs the kernels and Adam beta1 = 0 (RECIPES 1: then a latent with a zero gradient gets
    an exact lazy decay of its second moment and no update); every other run takes the dense step."""
    return backend == "triton" and optim.adam_beta1 == 0.0


def make_step(
    model: JumpReLUSAE, backend: str, optim: OptimConfig, mesh: Mesh | None = None, allow_dense_fallback: bool = False
) -> TrainStep:
    """The run's step (`sae.steps.TrainStep`), chosen once from the resolved backend and the optimizer.

    mesh: train `model`, this rank's latent slice, with the latent-sharded dense step (`DenseStep`'s mesh). The
    sparse step is not sharded: over more than one rank it is refused (ConfigError), or with allow_dense_fallback
    replaced, with a warning, by the sharded dense step, whose update is the same (the trainer's choice).
    """
    if uses_sparse_step(backend, optim):
        if mesh is not None and mesh.world > 1:
            if not allow_dense_fallback:
                raise ConfigError(
                    f"the sparse training step (--backend triton with --adam-beta1 0) runs on one process only, and "
                    f"this run has {mesh.world} ranks: its LazyAdam state is not sharded yet. Train on one process, "
                    "or take the sharded dense step with a non-zero --adam-beta1 (e.g. 0.9) or --backend reference"
                )
            if mesh.rank == 0:
                warnings.warn(
                    f"the sparse training step is not sharded yet: this run of {mesh.world} ranks takes the "
                    "latent-sharded dense step, the same update (Adam with beta1 = 0 over every latent, RECIPES 1) "
                    "with the full gradients of each rank's slice",
                    stacklevel=2,
                )
            return DenseStep(model, optim, mesh)
        return SparseStep(model, optim)
    return DenseStep(model, optim, mesh)


class Trainer:
    """Train one JumpReLU SAE on a stream of activation batches.

    Args:
        cfg: the run's config.
        source: an iterable of float tensors [B, D]; with state_dict()/load_state_dict() the data position
            is checkpointed too.
        metadata: cfg.json "metadata" (model_name, hook_name, ...), from the harvester.
        resume: a run folder or checkpoint folder to continue from.
        progress: show a progress bar.
        write: keep the run folder cfg.run.out_dir (config, metrics log, checkpoints); False: touch no file
            (logged records stay in `last_logged`; `save_checkpoint` refuses).
        mesh: the ranks this SAE's latents are split over (sae/distributed): each rank holds its slice of the
            latents and must be fed the same global batches (harvest.gather.GatheredBatches); rank 0 logs, every
            rank writes its shard of each checkpoint (torch.distributed.checkpoint) into the shared out_dir.
            None: one process, the world-size-1 case of the same code.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        source: Iterable[Tensor],
        metadata: dict[str, Any] | None = None,
        resume: str | Path | None = None,
        progress: bool = True,
        write: bool = True,
        mesh: Mesh | None = None,
    ):
        self.cfg = cfg
        self.mesh = mesh if mesh is not None else Mesh.single()
        self.sharded = self.mesh.world > 1
        self.lead = self.mesh.rank == 0  # logs, shows the bar, writes the run folder's config and metrics
        if self.sharded:
            check_same_config(self.mesh, cfg.to_dict())
        self.batches = BatchStream(source)
        self.metadata = metadata or {}
        self.progress = progress
        self.folder = RunFolder(cfg.run.out_dir) if write else None
        self.out_dir = Path(cfg.run.out_dir)
        self.step = 0
        self.tokens = 0
        self.scale = 1.0
        self.data_position: Any = None
        self.last_logged: dict[str, Any] = {}
        self._window: list[StepStats] | None = None  # steps since the last log line (None: none yet)
        self._t0, self._tokens0 = 0.0, 0
        self._run_t0, self._run_tokens0, self._wait_s = 0.0, 0, 0.0  # since this process's first step
        self.skipped_batches = 0
        self._loss_watch = LossWatch()
        self._alerts: list[str] = []
        checkpoint = ckpt.resume_checkpoint(resume) if resume is not None else None
        info = ckpt.load_training_info(checkpoint) if checkpoint is not None else None
        if info is None and self.folder is not None:
            self.folder.refuse_existing_run()
        d_in = int(info["d_in"]) if info else self._source_width(source)
        self.pretrained = load_pretrained(cfg.sae.init_from) if cfg.sae.init_from and info is None else None
        if info is not None:
            d_sae = int(info["d_sae"])
        else:
            d_sae = self._pretrained_width(d_in) if self.pretrained is not None else cfg.sae.width(d_in)
        cfg.check_width(d_in, d_sae)
        self.d_sae = d_sae  # the whole SAE's; self.model holds this rank's slice of it
        self.slice: LatentSlice = latent_slice(d_sae, self.mesh.world, self.mesh.rank)
        compute = resolve_compute(cfg.sae.backend, cfg.sae.compute_dtype, cfg.run.device)
        self.device, self.compute_dtype = compute.device, compute.dtype
        self.model = JumpReLUSAE(d_in, self.slice.size, cfg.sae.bandwidth, compute.backend, compute.dtype).to(
            self.device
        )
        mesh_for_step = self.mesh if self.sharded else None
        self.stepper = make_step(self.model, compute.backend, cfg.optim, mesh_for_step, allow_dense_fallback=True)
        self.tokens_since_fired = torch.zeros(self.model.d_sae, dtype=torch.int64, device=self.device)
        if checkpoint is not None:
            self._restore(self._load_state(checkpoint))
        else:
            self._initialise()
        if self.folder is not None and self.lead:
            self.folder.start(cfg.to_dict(), None if info is None else self.step)
        self._saved_step = self.step

    @property
    def sparse_step(self) -> bool:
        """Whether the run takes the sparse step (Triton kernels and LazyAdam)."""
        return isinstance(self.stepper, SparseStep)

    # -- set-up ------------------------------------------------------------------------------------

    def _source_width(self, source: Iterable[Tensor]) -> int:
        d_in = getattr(source, "d_in", None)
        return int(d_in) if d_in is not None else int(self.batches.peek(1)[0].shape[-1])

    def _pretrained_width(self, d_in: int) -> int:
        source_d_in, d_sae = self.pretrained["W_enc"].shape
        if source_d_in != d_in:
            raise ConfigError(
                f"--init-from {self.cfg.sae.init_from} has d_in={source_d_in} but the activations have d_in={d_in}: "
                "it was trained on another model or layer"
            )
        if self.cfg.sae.d_sae is not None and self.cfg.sae.d_sae != d_sae:
            raise ConfigError(f"--d-sae {self.cfg.sae.d_sae} differs from the width {d_sae} of --init-from; drop it")
        return d_sae

    @torch.no_grad()
    def _initialise(self) -> None:
        """Fix the activation scale, then initialise the SAE (RECIPES 1, with the data-driven options)."""
        cfg = self.cfg
        x = torch.cat([b.to(self.device, torch.float32) for b in self.batches.peek(cfg.run.init_batches)])
        if x.shape[-1] != self.model.d_in:
            raise ValueError(f"batches have width {x.shape[-1]} but the source reports d_in={self.model.d_in}")
        if cfg.run.scale_activations:
            self.scale = float((self.model.d_in / x.pow(2).sum(-1).mean()).sqrt())
        x = x * self.scale
        if self.pretrained is not None:
            self.model.load_raw(self._local(self.pretrained), self.scale)
            self.pretrained = None
        else:
            generator = torch.Generator().manual_seed(cfg.run.seed)
            self.model.init_tied(cfg.sae.threshold_init, generator, first_latent=self.slice.start)
            if cfg.sae.b_dec_init == "mean":
                self.model.b_dec.copy_(x.mean(0))
            if cfg.sae.init_l0 is not None:
                self.model.init_thresholds_for_l0(x, cfg.sae.init_l0, floor=THRESHOLD_FLOOR, total_latents=self.d_sae)

    def _local(self, whole: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's slice of whole-SAE tensors keyed by parameter name (b_dec and others unchanged)."""
        sl = self.slice
        return {k: v.narrow(LATENT_DIM[k], sl.start, sl.size) if k in LATENT_DIM else v for k, v in whole.items()}

    def _load_state(self, checkpoint: Path) -> ckpt.TrainingState:
        """The training state of `checkpoint` as this rank's tensors: its slice of the latent-indexed ones."""
        from sae.distributed.checkpoint import is_sharded, load_sharded

        if is_sharded(checkpoint):  # saved by a latent-sharded run: DCP reshards it onto this run's ranks
            return load_sharded(checkpoint, self.mesh, self.slice)
        state = ckpt.load_training_state(checkpoint)
        if not self.sharded:
            return state
        return ckpt.TrainingState(state.info, self._local_state(state.tensors))

    def _local_state(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's slice of a whole SAE's training-state tensors: parameters, Adam moments (the sparse step's
        LazyAdam state converted to Adam's first, exactly) and the dead-latent counters."""
        from sae.sparse_step import adam_state_from_lazy
        from sae.steps import DENSE_PREFIX, saved_optimizer_state

        adam, lazy = saved_optimizer_state(tensors)
        if lazy:
            adam = adam_state_from_lazy(lazy)
        sl = self.slice
        out = {k: v for k, v in tensors.items() if not k.startswith(("param.", "optim.", "lazy_adam."))}
        out["tokens_since_fired"] = tensors["tokens_since_fired"][sl.start : sl.stop]
        out.update({f"param.{k}": v for k, v in self._local({n: tensors[f"param.{n}"] for n in PARAM_NAMES}).items()})
        for name, moments in adam.items():
            for moment, value in moments.items():
                local = value if moment == "step" or name not in LATENT_DIM else self._local({name: value})[name]
                out[f"{DENSE_PREFIX}{name}.{moment}"] = local
        return out

    def _restore(self, state: ckpt.TrainingState) -> None:
        info, tensors = state
        saved = info["config"]
        now = self.cfg.to_dict()
        changed = [  # a field the checkpoint predates has taken its default: not a change
            f"--{k.replace('_', '-')} ({saved[s][k]!r} -> {now[s][k]!r})"
            for s in _FROZEN_SECTIONS
            for k in now[s]
            if k not in _MOVABLE_FIELDS and k in saved.get(s, {}) and saved[s][k] != now[s][k]
        ]
        if saved.get("optim", {}).get("batch_size") != now["optim"]["batch_size"]:
            changed.append("--batch-size")
        if changed:
            raise ckpt.CheckpointError(
                "the checkpoint was trained with a different config; these settings cannot change on resume: "
                + ", ".join(changed)
            )
        with torch.no_grad():
            for name in PARAM_NAMES:
                getattr(self.model, name).copy_(tensors[f"param.{name}"])
        self.stepper.load_state_dict(tensors)
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"])
        if "rng.torch" in tensors:  # absent when a sharded state is resumed on another number of ranks
            ckpt.restore_rng(tensors)
        self.step, self.tokens, self.scale = int(info["step"]), int(info["tokens"]), float(info["scale"])
        self.skipped_batches = int(info.get("skipped_batches", 0))
        self.data_position = info.get("data_position")
        if self.sharded and isinstance(self.data_position, dict) and set(self.data_position) != {"world", "ranks"}:
            # one process's position, resumed on several ranks: the source deals it out (harvest.gather)
            self.data_position = {"world": 1, "ranks": [self.data_position]}
        if self.data_position is not None:
            self.batches.load_state_dict(self.data_position)
        elif self.step > 0:
            warnings.warn(
                "the checkpoint has no data position: the batch source starts again from its beginning", stacklevel=2
            )

    # -- one step ----------------------------------------------------------------------------------

    def train_step(self, x: Tensor) -> StepStats:
        """One step of the run's `TrainStep` at this step's learning rate and sparsity coefficient."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg.optim.lr, cfg.optim.lr_warmup_steps, cfg.run.steps, cfg.optim.lr_decay_fraction)
        coefficient = sparsity_coefficient_at(
            self.step, cfg.objective.l0_coefficient, cfg.objective.sparsity_warmup_steps
        )
        objective = Objective(cfg.objective.sparsity, coefficient, cfg.objective.target_l0, cfg.objective.tilt)
        out = self.stepper(x, lr, objective)
        with torch.no_grad():
            self._track_fires(out.indices, out.values)
        return StepStats(
            out.loss,
            out.reconstruction,
            out.mse,
            out.sparsity,
            out.l0,
            out.explained_variance,
            out.grad_norm,
            lr,
            coefficient,
            out.encode_reruns,
            float(out.communicated_bytes),
        )

    def _track_fires(self, indices: Tensor, values: Tensor) -> None:
        self.tokens_since_fired += indices.shape[0]
        self.tokens_since_fired[indices[values > 0]] = 0

    def dead_window(self) -> int:
        """The dead-latent window actually covered: the configured one, or all tokens so far if fewer."""
        return min(self.cfg.run.dead_window_tokens, self.tokens)

    def dead_fraction(self) -> float:
        """Of all the SAE's latents (over every rank: a collective when sharded, called at the same step by all)."""
        window = self.dead_window()
        if window <= 0:
            return 0.0
        dead = (self.tokens_since_fired >= window).sum().to(torch.float64)
        if self.sharded:
            self.mesh.all_reduce_sum_(dead, "dead_latents")
        return float(dead) / self.d_sae

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self) -> TrainSummary:
        """Train until cfg.run.steps; checkpoint periodically, at the end and on Ctrl-C. A non-finite value
        stops the run with `TrainingHealthError` (or skips the batch, per --on-nonfinite); warnings (an
        exploding loss) are printed above the bar and logged."""
        bar = tqdm(
            total=self.cfg.run.steps,
            initial=self.step,
            unit="step",
            disable=not (self.progress and self.lead),
            dynamic_ncols=True,
        )
        try:
            while not self.done:
                stats = self.fit_step()
                for text in self.pop_alerts():
                    bar.write(text)
                if stats is not None and (self.step % self.cfg.run.log_every == 0 or self.done):
                    bar.set_postfix(self.postfix(stats), refresh=False)
                bar.update(1)
        except KeyboardInterrupt:
            path = self.save_if_unsaved()
            if path is not None:
                bar.write(f"interrupted at step {self.step}; saved {path}. Continue with --resume {self.out_dir}")
            raise
        finally:
            bar.close()
        return self.summary()

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.run.steps

    def fit_step(self) -> StepStats | None:
        """One step of the loop: the next batch, train_step, the log line and the checkpoint when due.
        None when the batch was skipped (--on-nonfinite skip)."""
        cfg = self.cfg
        now = time.perf_counter()
        if self._window is None:
            self._window, self._t0, self._tokens0 = [], now, self.tokens
            self._run_t0, self._run_tokens0, self._wait_s = now, self.tokens, 0.0
        x, position = self.batches.next()
        x = x.to(self.device, torch.float32, non_blocking=True) * self.scale
        self._wait_s += time.perf_counter() - now
        try:
            stats = self.train_step(x)
        except NonFiniteStep as bad:
            self._nonfinite(bad)
            stats = None
        self.step += 1
        self.tokens += x.shape[0]
        self.data_position = position
        if stats is not None:
            self._window.append(stats)
            alert = self._loss_watch.update(self.step, stats.loss)
            if alert is not None:
                self._alerts.append(alert)
        if (self.step % cfg.run.log_every == 0 or self.done) and self._window:
            now = time.perf_counter()
            self._check_parameters()
            self._log(self._window, (self.tokens - self._tokens0) / max(now - self._t0, 1e-9))
            self._window, self._t0, self._tokens0 = [], now, self.tokens
        if self.step % cfg.run.checkpoint_every == 0 or self.done:
            self.save_checkpoint()
        return stats

    def _nonfinite(self, bad: NonFiniteStep) -> None:
        """Stop (the default) or count the skipped batch; the step applied nothing either way."""
        run = self.cfg.run
        if run.on_nonfinite == "skip" and self.skipped_batches < run.max_skipped_batches:
            self.skipped_batches += 1
            self._alerts.append(
                f"warning: skipped the batch of step {self.step + 1}: its {bad} "
                f"({self.skipped_batches} of at most {run.max_skipped_batches} skips)"
            )
            return
        note = f" (after {self.skipped_batches} skipped batches)" if run.on_nonfinite == "skip" else ""
        self._stop(self.step + 1, bad.quantity + note, bad.value)

    def _check_parameters(self) -> None:
        """Stop when a parameter is not finite: on every rank when any rank's slice has one (a collective)."""
        bad = non_finite_parameters({name: getattr(self.model, name) for name in PARAM_NAMES})
        if self.sharded:
            ranks_bad = torch.tensor([float(bool(bad))], device=self.device)
            if float(self.mesh.all_reduce_sum_(ranks_bad, "health")) > 0 and not bad:
                bad = ["of another rank's latent slice"]
        if bad:
            self._stop(self.step, f"parameter {', '.join(bad)}", float("nan"))

    def _stop(self, step: int, quantity: str, value: float) -> None:
        last = self.folder.latest_checkpoint() if self.folder is not None else None
        raise TrainingHealthError(stop_message(step, quantity, value, None if last is None else str(last)))

    def pop_alerts(self) -> list[str]:
        """Warnings raised since the last call (printed above the progress bar by `fit`)."""
        alerts, self._alerts = self._alerts, []
        return alerts

    def postfix(self, stats: StepStats) -> dict[str, str]:
        """The progress bar's figures after a logged step: tokens/s since the run (or resume) started, and the
        share of that time spent waiting for activations (high: the language model is the bottleneck)."""
        last = self.last_logged
        out = {
            "tok/s": f"{last.get('tokens_per_s_run', 0.0):,.0f}",
            "wait": f"{last.get('wait_fraction', 0.0):.0%}",
            "loss": f"{stats.loss:.4g}",
            "L0": f"{stats.l0:.1f}",
            "EV": f"{stats.explained_variance:.3f}",
        }
        if self._loss_watch.exploding:
            out["warning"] = "loss exploding"
        return out

    def save_if_unsaved(self) -> Path | None:
        """Checkpoint the steps taken since the last checkpoint (on Ctrl-C); None when there are none."""
        return self.save_checkpoint() if self.step > self._saved_step else None

    def _log(self, window: list[StepStats], tokens_per_s: float) -> None:
        record: dict[str, Any] = {"step": self.step, "tokens": self.tokens}
        for name in StepStats._fields:
            record[name] = sum(getattr(s, name) for s in window) / len(window)
        elapsed = max(time.perf_counter() - self._run_t0, 1e-9)
        record.update(
            tokens_per_s=tokens_per_s,
            dead_fraction=self.dead_fraction(),
            dead_window_tokens=self.dead_window(),
            tokens_per_s_run=(self.tokens - self._run_tokens0) / elapsed,
            wait_fraction=self._wait_s / elapsed,
            skipped_batches=self.skipped_batches,
        )
        if self.sharded:
            record["world_size"] = self.mesh.world
        source_stats = getattr(self.batches.source, "stats", None)  # the harvester's counts, if the source has them
        if callable(source_stats):
            record.update(source_stats())
        if self._loss_watch.exploding:
            record["warning"] = "loss exploding"
        if self.folder is not None and self.lead:
            self.folder.log(record)
        self.last_logged = record

    # -- saving ------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step; refused (TrainingHealthError) if a parameter is not finite."""
        if self.folder is None:
            raise RuntimeError("this Trainer was built with write=False: it keeps no run folder to save into")
        self._check_parameters()
        if self.sharded:
            return self._save_sharded()
        self._saved_step = self.step
        model = self.model
        state_tensors = {
            **{f"param.{name}": getattr(model, name) for name in PARAM_NAMES},
            **self.stepper.state_dict(),
            "tokens_since_fired": self.tokens_since_fired,
            **ckpt.rng_state(),
        }
        return self.folder.save_checkpoint(
            self.step,
            model.export_raw(self.scale),
            ckpt.sae_cfg(model.d_in, model.d_sae, self.metadata, self._cfg_extra()),
            self._state_info(self.data_position),
            state_tensors,
            self.cfg.run.keep_checkpoints,
        )

    def _save_sharded(self) -> Path:
        """Every rank writes its shard of the training state (DCP); rank 0 writes the whole export from blocks."""
        from sae.distributed.checkpoint import save_sharded

        if self.folder is None:
            raise RuntimeError("this Trainer was built with write=False: it keeps no run folder to save into")
        self._saved_step = self.step
        ranks = self.mesh.all_gather_object(self.data_position, "data_position")
        position = None if all(p is None for p in ranks) else {"world": self.mesh.world, "ranks": ranks}
        model = self.model
        state = {
            **{f"param.{name}": getattr(model, name).detach() for name in PARAM_NAMES},
            **self.stepper.state_dict(),
            "tokens_since_fired": self.tokens_since_fired,
        }
        return save_sharded(
            self.folder.path / "checkpoints",
            self.step,
            self.mesh,
            state,
            ckpt.rng_state(),
            {**self._state_info(position), "sharded": {"world": self.mesh.world}},
            (model.export_raw(self.scale), ckpt.sae_cfg(model.d_in, self.d_sae, self.metadata, self._cfg_extra())),
            self.cfg.run.keep_checkpoints,
        )

    def _state_info(self, data_position: Any) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "scale": self.scale,
            "d_in": self.model.d_in,
            "d_sae": self.d_sae,
            "data_position": data_position,
            "config": self.cfg.to_dict(),
            "skipped_batches": self.skipped_batches,
        }

    def _cfg_extra(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "folded_activation_scale": self.scale,
            "bandwidth": self.model.bandwidth,
            "sparsity": dataclasses.asdict(self.cfg.objective),
        }

    def summary(self) -> TrainSummary:
        """The run so far; L0 and explained variance are means over the last log interval."""
        last = self.last_logged
        return TrainSummary(
            checkpoint=self.folder.latest_checkpoint() if self.folder is not None else None,
            step=self.step,
            tokens=self.tokens,
            l0=last.get("l0", float("nan")),
            explained_variance=last.get("explained_variance", float("nan")),
            dead_fraction=self.dead_fraction(),
            dead_window_tokens=self.dead_window(),
        )
