"""Configs of the SAE, its objective, the optimiser and the run, composed with the harvester's into one.

Every field has a docstring on the line after it: `sae.config_cli` turns them into `--help`. Field names
are unique across all sections because the command line is flat (`--d-sae`, `--target-l0`, ...).
Defaults are the embedded offline run (Gemma-3 270M, ICD-10-CM, a few CPU minutes); the README lists the
flags of the Gemma Scope and Salmon recipes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from harvest.config import BufferConfig, DataConfig, DtypeName, ModelConfig
from sae.config_cli import from_sections
from sae.errors import ConfigError
from sae.objectives import SPARSITY_KINDS, SparsityKind
from sae.ops import BACKENDS, COMPUTE_DTYPES, Backend

BDecInit = Literal["zeros", "mean"]
ComputeDtype = Literal["auto", DtypeName]
NonFiniteAction = Literal["stop", "skip"]


@dataclass
class SAEConfig:
    """The SAE: width, initialisation, backend and precision."""

    d_sae: int | None = None
    """Number of latents F. Default: expansion_factor * d_in."""
    expansion_factor: int = 4
    """d_sae = expansion_factor * d_in when --d-sae is not given."""
    bandwidth: float = 0.001
    """STE window width eps of the threshold pseudo-derivatives (RECIPES: 0.001)."""
    threshold_init: float = 0.001
    """Initial threshold of every latent (RECIPES: 0.001). Not used when --init-l0 is set."""
    init_l0: float | None = 128.0
    """If set, each latent's threshold starts at the quantile of its pre-activations on the first batches
    at which it fires on init_l0/d_sae of tokens, so training starts at L0 ~ init_l0 instead of ~d_sae/2
    (RECIPES section 7: from theta = 0.001 a short run cannot reach a small L0)."""
    b_dec_init: BDecInit = "mean"
    """Decoder bias init: "zeros" (RECIPES) or "mean" of the first batches (halved delta CE in RECIPES 7)."""
    init_from: str | None = None
    """Fine-tune an existing SAE instead of starting from scratch: a checkpoint or SAELens-style folder, a run
    folder (its latest checkpoint), or a Gemma Scope params.npz. Its width replaces --d-sae, and
    --b-dec-init / --init-l0 / --threshold-init are not used."""
    backend: Backend = "auto"
    """SAE forward/backward: "triton" (fused sparse kernels, CUDA), "reference" (dense PyTorch), or "auto"
    (triton on CUDA, reference elsewhere)."""
    compute_dtype: ComputeDtype = "auto"
    """Operand dtype of the SAE's matrix products: "bfloat16" (tensor cores; accumulation, parameters,
    thresholds, gradients and Adam state stay float32), "float32", "float16", or "auto" (bfloat16 on CUDA,
    float32 elsewhere)."""

    def __post_init__(self) -> None:
        if self.d_sae is not None and self.d_sae < 1:
            raise ConfigError(f"--d-sae must be a positive number of latents; got {self.d_sae}")
        if self.expansion_factor < 1:
            raise ConfigError(f"--expansion-factor must be >= 1; got {self.expansion_factor}")
        if not self.bandwidth > 0:
            raise ConfigError(f"--bandwidth must be > 0; got {self.bandwidth}")
        if not self.threshold_init > 0:
            raise ConfigError(f"--threshold-init must be > 0 (JumpReLU needs theta > 0); got {self.threshold_init}")
        if self.init_l0 is not None and not self.init_l0 > 0:
            raise ConfigError(f"--init-l0 must be > 0 (or omitted); got {self.init_l0}")
        if self.compute_dtype not in get_args(ComputeDtype):
            raise ConfigError(
                f"--compute-dtype must be auto or one of {tuple(COMPUTE_DTYPES)}; got {self.compute_dtype!r}"
            )
        if self.b_dec_init not in get_args(BDecInit):
            raise ConfigError(f"--b-dec-init must be one of {get_args(BDecInit)}; got {self.b_dec_init!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {BACKENDS}; got {self.backend!r}")

    def width(self, d_in: int) -> int:
        """The number of latents F for an input width d_in."""
        return self.d_sae if self.d_sae is not None else self.expansion_factor * d_in


@dataclass
class ObjectiveConfig:
    """The loss: reconstruction (mean or tilted) plus sparsity."""

    sparsity: SparsityKind = "target_l0"
    """Sparsity term: "l0" = lambda * mean L0 (Gemma Scope), "target_l0" = lambda * (L0/target - 1)^2 (Salmon)."""
    l0_coefficient: float = 1.0
    """lambda, the sparsity coefficient (Salmon: 1 with target_l0; Gemma Scope sweeps it with l0)."""
    target_l0: float = 32.0
    """Target mean L0 of the target_l0 objective."""
    sparsity_warmup_steps: int = 100
    """lambda rises linearly from 0 over this many steps (Gemma Scope 10k, Salmon 5k)."""
    tilt: float = 0.0
    """TERM tilt t of the reconstruction term (1/t) log mean exp(t * per-token error): 0 = the plain mean;
    larger t up-weights badly reconstructed tokens (Specialized SAEs used 500 and 1e9)."""

    def __post_init__(self) -> None:
        if self.sparsity not in SPARSITY_KINDS:
            raise ConfigError(f"--sparsity must be one of {SPARSITY_KINDS}; got {self.sparsity!r}")
        if self.l0_coefficient < 0:
            raise ConfigError(f"--l0-coefficient must be >= 0; got {self.l0_coefficient}")
        if not self.target_l0 > 0:
            raise ConfigError(f"--target-l0 must be > 0; got {self.target_l0}")
        if not (self.tilt >= 0 and math.isfinite(self.tilt)):
            raise ConfigError(f"--tilt must be a finite number >= 0 (0 = plain mean); got {self.tilt}")
        if self.sparsity_warmup_steps < 0:
            raise ConfigError(f"--sparsity-warmup-steps must be >= 0; got {self.sparsity_warmup_steps}")


@dataclass
class OptimConfig:
    """Adam, the learning-rate schedule and the batch."""

    lr: float = 1e-3
    """Adam learning rate (Gemma Scope 7e-5, Salmon 3e-4; the short offline default uses 1e-3)."""
    adam_beta1: float = 0.0
    """Adam beta1 (RECIPES: 0)."""
    adam_beta2: float = 0.999
    """Adam beta2 (RECIPES: 0.999)."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    lr_warmup_steps: int = 20
    """Learning rate rises linearly from 0 over this many steps (RECIPES: 1000)."""
    lr_decay_fraction: float = 0.2
    """Learning rate decays linearly to 0 over this last fraction of the steps (Salmon: 0.2; 0 = none)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (RECIPES: 1.0; 0 = no clipping)."""
    batch_size: int = 1024
    """Activations per training step (Gemma Scope 4096, Salmon 2048)."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0; got {self.lr}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ConfigError(f"Adam betas must lie in [0, 1); got ({self.adam_beta1}, {self.adam_beta2})")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise ConfigError(f"--lr-decay-fraction must lie in [0, 1]; got {self.lr_decay_fraction}")
        if self.lr_warmup_steps < 0 or self.max_grad_norm < 0:
            raise ConfigError("--lr-warmup-steps and --max-grad-norm must be >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1; got {self.batch_size}")


@dataclass
class RunConfig:
    """Length, output folder, device, checkpoints and logging."""

    steps: int = 256
    """Training steps; tokens trained on = steps * batch_size."""
    out_dir: str = "runs/default"
    """Run folder: metrics.jsonl, run_config.json and checkpoints/ land here."""
    seed: int = 0
    """Seeds the SAE initialisation."""
    device: str = "auto"
    """Training device: "cpu", "cuda", "cuda:N", or "auto" (cuda when available)."""
    init_batches: int = 4
    """Batches used to estimate the activation scale (and b_dec / thresholds when initialised from data);
    they are then trained on like any other batch."""
    scale_activations: bool = True
    """Scale activations by one fixed scalar so that E||x||^2 = d_in (folded into the saved weights)."""
    dead_window_tokens: int = 10_000_000
    """A latent is dead when it has not fired in this many tokens (convention: 10M)."""
    checkpoint_every: int = 100
    """Save a resumable checkpoint every this many steps (and at the end, and on Ctrl-C)."""
    keep_checkpoints: int = 2
    """How many of the most recent checkpoints to keep."""
    log_every: int = 10
    """Write a metrics.jsonl line every this many steps."""
    on_nonfinite: NonFiniteAction = "stop"
    """When a step's loss or gradient norm is not finite (the step applies nothing): "stop" the run with a
    message (the last good checkpoint is kept), or "skip" the batch and go on, up to --max-skipped-batches."""
    max_skipped_batches: int = 10
    """With --on-nonfinite skip: stop anyway after this many skipped batches (a run that keeps producing
    non-finite values is broken, not unlucky)."""
    collective_timeout_s: float = 300.0
    """Under torchrun: how long a rank waits in a collective for the others before it stops with an error (a rank
    that died or hangs stops the run instead of hanging it)."""

    def __post_init__(self) -> None:
        if not self.collective_timeout_s > 0:
            raise ConfigError(f"--collective-timeout-s must be > 0 seconds; got {self.collective_timeout_s}")
        if self.on_nonfinite not in get_args(NonFiniteAction):
            raise ConfigError(f"--on-nonfinite must be one of {get_args(NonFiniteAction)}; got {self.on_nonfinite!r}")
        if self.max_skipped_batches < 0:
            raise ConfigError(f"--max-skipped-batches must be >= 0; got {self.max_skipped_batches}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1; got {self.steps}")
        for name in ("init_batches", "checkpoint_every", "keep_checkpoints", "log_every", "dead_window_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")


@dataclass
class TrainConfig:
    """Everything a training run needs; saved with every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def check_width(self, d_in: int, d_sae: int) -> None:
        """Raise ConfigError when the SAE width and the sparsity targets cannot work together."""
        if self.objective.sparsity == "target_l0" and self.objective.target_l0 >= d_sae:
            raise ConfigError(
                f"--target-l0 {self.objective.target_l0} must be well below d_sae {d_sae}: lower it or widen the SAE"
            )
        if self.sae.init_l0 is not None and self.sae.init_from is None and self.sae.init_l0 >= d_sae:
            raise ConfigError(f"--init-l0 {self.sae.init_l0} must be below d_sae {d_sae}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild from `to_dict` output; unknown sections or fields raise ConfigError naming them."""
        return from_sections(cls, data)
