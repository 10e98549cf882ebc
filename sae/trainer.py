"""The training loop: short named steps around one `train_step`.

The trainer consumes any iterable of activation batches [B, D] (see `sae.batches`); it does not know where
they come from. It trains on scale * x with scale fixed from the first batches so that E||x||^2 = d_in,
and saves checkpoints whose SAE acts on raw x.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from harvest.lm import resolve_device
from sae import checkpoint as ckpt
from sae.batches import BatchStream
from sae.config import TrainConfig
from sae.errors import ConfigError
from sae.model import PARAM_NAMES, THRESHOLD_FLOOR, JumpReLUSAE
from sae.objectives import Objective, sae_loss
from sae.ops import resolve_backend, resolve_compute_dtype
from sae.pretrained import load_pretrained
from sae.schedule import lr_at, sparsity_coefficient_at
from sae.sparse_step import (
    adam_state_from_lazy,
    build_lazy_adam,
    lazy_state_from_adam,
    sparse_train_step,
)

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


class TrainSummary(NamedTuple):
    checkpoint: Path
    step: int
    tokens: int
    l0: float
    explained_variance: float
    dead_fraction: float
    dead_window_tokens: int


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 over the batch (variance about the mean, RECIPES 3)."""
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return 1.0 - residual / total


class Trainer:
    """Train one JumpReLU SAE on a stream of activation batches.

    Args:
        cfg: the run's config.
        source: an iterable of float tensors [B, D]; with state_dict()/load_state_dict() the data position
            is checkpointed too.
        metadata: cfg.json "metadata" (model_name, hook_name, ...), from the harvester.
        resume: a run folder or checkpoint folder to continue from.
        progress: show a progress bar.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        source: Iterable[Tensor],
        metadata: dict[str, Any] | None = None,
        resume: str | Path | None = None,
        progress: bool = True,
    ):
        self.cfg = cfg
        self.batches = BatchStream(source)
        self.metadata = metadata or {}
        self.progress = progress
        self.device = resolve_device(cfg.run.device)
        self.out_dir = Path(cfg.run.out_dir)
        self.step = 0
        self.tokens = 0
        self.scale = 1.0
        self.data_position: Any = None
        self.last_logged: dict[str, Any] = {}
        self._window: list[StepStats] | None = None  # steps since the last log line (None: none yet)
        self._t0, self._tokens0 = 0.0, 0
        state = ckpt.load_training_state(ckpt.find_checkpoint(resume)) if resume is not None else None
        if state is None and ckpt.has_checkpoints(self.out_dir):
            raise ckpt.CheckpointError(
                f"{self.out_dir} already holds a run; continue it with --resume {self.out_dir} "
                "or pick another --out-dir"
            )
        d_in = int(state.info["d_in"]) if state else self._source_width(source)
        self.pretrained = load_pretrained(cfg.sae.init_from) if cfg.sae.init_from and state is None else None
        if state is not None:
            d_sae = int(state.info["d_sae"])
        else:
            d_sae = self._pretrained_width(d_in) if self.pretrained is not None else cfg.sae.width(d_in)
        cfg.check_width(d_in, d_sae)
        backend = resolve_backend(cfg.sae.backend, self.device)
        dtype_name = cfg.sae.compute_dtype
        if dtype_name == "auto":
            dtype_name = "bfloat16" if self.device.type == "cuda" else "float32"
        self.compute_dtype = resolve_compute_dtype(dtype_name, backend)
        self.model = JumpReLUSAE(d_in, d_sae, cfg.sae.bandwidth, backend, self.compute_dtype).to(self.device)
        # With the kernels and beta1 = 0 the whole step is sparse, optimizer included (sae/sparse_step.py).
        self.sparse_step = backend == "triton" and cfg.optim.adam_beta1 == 0.0 and cfg.objective.tilt == 0.0
        if self.sparse_step:
            self.optimizer = build_lazy_adam(self.model, cfg.optim.adam_beta2, cfg.optim.adam_eps)
        else:
            self.optimizer = torch.optim.Adam(
                [getattr(self.model, name) for name in PARAM_NAMES], lr=cfg.optim.lr,
                betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2), eps=cfg.optim.adam_eps,
            )
        self.capacity: int | None = None  # encode slots per row of the sparse step; None: the kernel's default
        self.tokens_since_fired = torch.zeros(self.model.d_sae, dtype=torch.int64, device=self.device)
        if state is not None:
            self._restore(state)
        else:
            self._initialise()
        self._saved_step = self.step

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
            self.model.load_raw(self.pretrained, self.scale)
            self.pretrained = None
        else:
            self.model.init_tied(cfg.sae.threshold_init, torch.Generator().manual_seed(cfg.run.seed))
            if cfg.sae.b_dec_init == "mean":
                self.model.b_dec.copy_(x.mean(0))
            if cfg.sae.init_l0 is not None:
                self.model.init_thresholds_for_l0(x, cfg.sae.init_l0, floor=THRESHOLD_FLOOR)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "metrics.jsonl").write_text("")
        (self.out_dir / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    def _restore(self, state: ckpt.TrainingState) -> None:
        info, tensors = state
        saved = info["config"]
        now = self.cfg.to_dict()
        changed = [  # a field the checkpoint predates has taken its default: not a change
            f"--{k.replace('_', '-')} ({saved[s][k]!r} -> {now[s][k]!r})"
            for s in _FROZEN_SECTIONS for k in now[s]
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
        self._restore_optimizer(tensors)
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"])
        ckpt.restore_rng(tensors)
        self.step, self.tokens, self.scale = int(info["step"]), int(info["tokens"]), float(info["scale"])
        self.data_position = info.get("data_position")
        if self.data_position is not None:
            self.batches.load_state_dict(self.data_position)
        elif self.step > 0:
            warnings.warn("the checkpoint has no data position: the batch source starts again from its beginning")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "run_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        self._truncate_metrics()

    def _restore_optimizer(self, tensors: dict[str, Tensor]) -> None:
        """Load Adam's state, converting between the dense and the sparse step's formats if the backend changed."""
        lazy = {k[len("lazy_adam."):]: v for k, v in tensors.items() if k.startswith("lazy_adam.")}
        by_name: dict[str, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                name, moment = key[len("optim."):].split(".", 1)
                by_name.setdefault(name, {})[moment] = value
        if self.sparse_step:
            self.optimizer.load_state_dict(lazy or lazy_state_from_adam(self.optimizer, by_name))
            return
        if lazy:
            by_name = adam_state_from_lazy(lazy)
        state = {  # the optimizer holds the parameters in PARAM_NAMES order
            i: {k: v if k == "step" else v.to(self.device) for k, v in by_name[name].items()}
            for i, name in enumerate(PARAM_NAMES) if name in by_name
        }
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})

    def _truncate_metrics(self) -> None:
        """Drop metrics lines logged after the checkpoint, so the resumed run's log reads as one run."""
        path = self.out_dir / "metrics.jsonl"
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            path.write_text("".join(ln + "\n" for ln in lines))

    # -- one step ----------------------------------------------------------------------------------

    def train_step(self, x: Tensor) -> StepStats:
        """Forward, loss, backward, decoder-gradient projection, clipping, Adam, renormalisation."""
        cfg, model = self.cfg, self.model
        lr = lr_at(self.step, cfg.optim.lr, cfg.optim.lr_warmup_steps, cfg.run.steps, cfg.optim.lr_decay_fraction)
        coefficient = sparsity_coefficient_at(
            self.step, cfg.objective.l0_coefficient, cfg.objective.sparsity_warmup_steps
        )
        if self.sparse_step:
            objective = Objective(cfg.objective.sparsity, coefficient, cfg.objective.target_l0, cfg.objective.tilt)
            step = sparse_train_step(
                model, self.optimizer, x, lr, objective, cfg.optim.max_grad_norm, capacity=self.capacity
            )
            # Slots per row for the next encode: 25% above this batch's largest L0, so overflow (a second
            # encode) stays rare while the compact lists stay small.
            self.capacity = min(model.d_sae, max(8, math.ceil(1.25 * step.max_l0)))
            self._track_fires(step.indices, step.values)
            st = step.stats
            return StepStats(st.loss, st.reconstruction, st.mse, st.sparsity, st.l0,
                             st.explained_variance, st.grad_norm, lr, coefficient, float(step.reruns))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        out = model(x)
        loss = sae_loss(
            x, out.x_hat, out.l0, cfg.objective.sparsity, coefficient, cfg.objective.target_l0, cfg.objective.tilt
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        model.project_decoder_grad()
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        self.optimizer.step()
        with torch.no_grad():
            model.normalize_decoder()
            model.threshold.clamp_(min=THRESHOLD_FLOOR)
            self._track_fires(out.indices, out.values)
            ev = explained_variance(x, out.x_hat)
        return StepStats(
            loss.total.item(), loss.reconstruction.item(), loss.mse.item(), loss.sparsity.item(), out.l0.mean().item(),
            ev.item(), grad_norm.item(), lr, coefficient, 0.0,
        )

    def _track_fires(self, indices: Tensor, values: Tensor) -> None:
        self.tokens_since_fired += indices.shape[0]
        self.tokens_since_fired[indices[values > 0]] = 0

    def dead_window(self) -> int:
        """The dead-latent window actually covered: the configured one, or all tokens so far if fewer."""
        return min(self.cfg.run.dead_window_tokens, self.tokens)

    def dead_fraction(self) -> float:
        window = self.dead_window()
        return float((self.tokens_since_fired >= window).float().mean()) if window > 0 else 0.0

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self) -> TrainSummary:
        """Train until cfg.run.steps; checkpoint periodically, at the end and on Ctrl-C."""
        bar = tqdm(total=self.cfg.run.steps, initial=self.step, unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        try:
            while not self.done:
                stats = self.fit_step()
                if self.step % self.cfg.run.log_every == 0 or self.done:
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

    def fit_step(self) -> StepStats:
        """One step of the loop: the next batch, train_step, the log line and the checkpoint when due."""
        cfg = self.cfg
        if self._window is None:
            self._window, self._t0, self._tokens0 = [], time.perf_counter(), self.tokens
        x, position = self.batches.next()
        x = x.to(self.device, torch.float32, non_blocking=True) * self.scale
        stats = self.train_step(x)
        self.step += 1
        self.tokens += x.shape[0]
        self.data_position = position
        self._window.append(stats)
        if self.step % cfg.run.log_every == 0 or self.done:
            now = time.perf_counter()
            self._log(self._window, (self.tokens - self._tokens0) / max(now - self._t0, 1e-9))
            self._window, self._t0, self._tokens0 = [], now, self.tokens
        if self.step % cfg.run.checkpoint_every == 0 or self.done:
            self.save_checkpoint()
        return stats

    def postfix(self, stats: StepStats) -> dict[str, str]:
        """The progress bar's figures after a logged step."""
        return {"tok/s": f"{self.last_logged.get('tokens_per_s', 0.0):,.0f}", "loss": f"{stats.loss:.4g}",
                "L0": f"{stats.l0:.1f}", "EV": f"{stats.explained_variance:.3f}"}

    def save_if_unsaved(self) -> Path | None:
        """Checkpoint the steps taken since the last checkpoint (on Ctrl-C); None when there are none."""
        return self.save_checkpoint() if self.step > self._saved_step else None

    def _log(self, window: list[StepStats], tokens_per_s: float) -> None:
        record: dict[str, Any] = {"step": self.step, "tokens": self.tokens}
        for name in StepStats._fields:
            record[name] = sum(getattr(s, name) for s in window) / len(window)
        record.update(
            tokens_per_s=tokens_per_s, dead_fraction=self.dead_fraction(), dead_window_tokens=self.dead_window()
        )
        with open(self.out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.last_logged = record

    # -- saving ------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        self._saved_step = self.step
        model = self.model
        if self.sparse_step:
            opt_tensors = {f"lazy_adam.{k}": v for k, v in self.optimizer.state_dict().items()}
        else:
            opt_tensors = {
                f"optim.{name}.{key}": value
                for name in PARAM_NAMES
                for key, value in self.optimizer.state.get(getattr(model, name), {}).items()
            }
        state_tensors = {
            **{f"param.{name}": getattr(model, name) for name in PARAM_NAMES},
            **opt_tensors,
            "tokens_since_fired": self.tokens_since_fired,
            **ckpt.rng_state(),
        }
        state_info = {
            "step": self.step, "tokens": self.tokens, "scale": self.scale, "d_in": model.d_in,
            "d_sae": model.d_sae, "data_position": self.data_position, "config": self.cfg.to_dict(),
        }
        extra = {
            "step": self.step, "tokens": self.tokens, "folded_activation_scale": self.scale,
            "bandwidth": model.bandwidth, "sparsity": dataclasses.asdict(self.cfg.objective),
        }
        return ckpt.write_checkpoint(
            self.out_dir / "checkpoints", self.step, model.export_raw(self.scale),
            ckpt.sae_cfg(model.d_in, model.d_sae, self.metadata, extra), state_info, state_tensors,
            self.cfg.run.keep_checkpoints,
        )

    def summary(self) -> TrainSummary:
        """The run so far; L0 and explained variance are means over the last log interval."""
        last = self.last_logged
        return TrainSummary(
            checkpoint=ckpt.find_checkpoint(self.out_dir),
            step=self.step,
            tokens=self.tokens,
            l0=last.get("l0", float("nan")),
            explained_variance=last.get("explained_variance", float("nan")),
            dead_fraction=self.dead_fraction(),
            dead_window_tokens=self.dead_window(),
        )
