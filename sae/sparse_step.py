"""The dense training step (sae/dense_step.py) done sparsely: Triton forward and backward with compact gradients,
then `LazyAdam`.

With Adam beta1 = 0 a parameter entry whose gradient is zero gets no update, only a second-moment decay that
`LazyAdam` applies lazily (RECIPES.md section 1), and the gradients of W_enc columns, W_dec rows, b_enc and
threshold are zero outside the latents that fired or had a pair in the threshold's STE window. So every step
of the dense recipe can be restricted to those T touched latents, exactly:

    dense (sae/dense_step.py)                          sparse (here), T touched latents
    forward + loss + autograd backward [F, D] grads     kernels.sparse_grads: [D, T] / [T, D] / [T] grads
    project_decoder_grad over all F rows                over the T touched rows (the others' grads are 0)
    clip_grad_norm_ over all parameters                 the same norm from the compact grads (+ b_dec)
    torch.optim.Adam(betas=(0, beta2))                  LazyAdam over the touched latents, dense for b_dec
    normalize_decoder over all F rows                   the T touched rows (only they moved)
    threshold.clamp_(min=1e-6) over all F               the T touched thresholds (only they moved)

Cost after the backward (`kernels.sparse_grads.optimizer_bytes`, fp32): about 58 * 4 * D * F bytes dense
against 72 * 4 * D * T sparse (LazyAdam gathers and scatters the touched slices with torch ops), so the
sparse step moves fewer bytes when T < 0.8 F, e.g. 3.7x fewer at T = 0.22 F (B * L0 = F / 4, uniform firing);
it also never holds the [F, D] gradients nor Adam's first moment (2 * D * F * 4 bytes each).

Mixed precision (`model.compute_dtype`, e.g. bf16): the kernels' products read bf16 copies of W_enc and W_dec
kept in `model.operand_cache` (sae/model.py); the compact gradients come back fp32 and update the fp32 masters,
and after the step the copies are re-rounded at the T touched latents only, so no step re-casts the [F, D]
matrices (a checkpoint load or any other write to the masters is detected and re-cast once).

Checkpoints hold `LazyAdam.state_dict()`; `lazy_state_from_adam` / `adam_state_from_lazy` convert to and from
torch Adam(0, beta2) state exactly, for a run resumed on the other step (the backend may change on resume).

The kernels are imported when a step runs, not with this module, so that importing it (as sae/trainer.py
will) does not fix Triton's interpreter mode for the process (see tests/test_kernels_common.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from sae.config import OptimConfig
from sae.health import check_step_values
from sae.model import PARAM_NAMES, THRESHOLD_FLOOR, JumpReLUSAE
from sae.objectives import Objective
from sae.sparse_adam import LazyAdam
from sae.steps import SPARSE_PREFIX, StepResult, explained_variance, saved_optimizer_state

if TYPE_CHECKING:
    from kernels.sae_pipeline import Blocks

# Which dimension of each SAE parameter indexes latents (None: dense, b_dec).
LATENT_DIMS: dict[str, int | None] = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "b_dec": None, "threshold": 0}


class SparseStepStats(NamedTuple):
    """What `sparse_train_step` measures, in the units of `sae.steps.StepResult` (mse last)."""

    loss: float
    reconstruction: float  # as optimised: tilted when the objective's tilt > 0
    sparsity: float
    l0: float  # mean over the batch
    explained_variance: float  # about the batch mean (RECIPES 3)
    grad_norm: float  # before clipping, of all parameters' gradients
    mse: float  # plain mean squared error summed over d_in, comparable across tilts


class SparseUpdate(NamedTuple):
    stats: SparseStepStats
    indices: Tensor  # [B, K] int64 active latents per row (for dead-latent tracking, like Forward.indices)
    values: Tensor  # [B, K] their values; > 0 marks a used slot
    reruns: int  # 1 when a row overflowed the encode's capacity and the encode ran again (exact, but slower)
    max_l0: int  # the largest row L0 of the batch: a good base for the next step's capacity


def build_lazy_adam(model: JumpReLUSAE, beta2: float = 0.999, eps: float = 1e-8, validate: bool = False) -> LazyAdam:
    """A `LazyAdam` over the SAE's parameters, registered in PARAM_NAMES order.

    validate: check `touched` on every step (reads values back from the device); the touched sets made by
    `sparse_train_step` are distinct and in range by construction, so it is off by default.
    """
    optimizer = LazyAdam(model.d_sae, beta2=beta2, eps=eps, validate=validate)
    for name in PARAM_NAMES:
        optimizer.add(name, getattr(model, name), LATENT_DIMS[name])
    return optimizer


def lazy_state_from_adam(optimizer: LazyAdam, adam_state: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """A `optimizer.load_state_dict` argument equal to torch Adam(0, beta2) per-parameter state, e.g. a
    checkpoint of the dense step resumed on the sparse one.

    adam_state: {name: {"step", "exp_avg_sq", ...}} for every registered name, or {} before the first step.
    Exact: torch's second moments have no pending decay (every latent up to date at `step`), and with beta1 = 0
    `exp_avg` is never read (torch's next `lerp_(grad, 1)` overwrites it with the gradient exactly).
    """
    state = optimizer.state_dict()
    if not adam_state:
        return state
    if set(adam_state) != set(optimizer.names):
        raise ValueError(f"Adam state for {sorted(adam_state)}; the optimizer has {sorted(optimizer.names)}")
    steps = {int(s["step"]) for s in adam_state.values()}
    if len(steps) != 1:
        raise ValueError(f"the parameters' Adam step counts differ: {sorted(steps)}")
    step = steps.pop()
    for name in optimizer.names:
        state[f"{name}.exp_avg_sq"] = adam_state[name]["exp_avg_sq"]
    if "latent_last_step" in state:
        state["latent_last_step"] = torch.full_like(state["latent_last_step"], step)
    state["step"] = torch.tensor(step, dtype=torch.int64)
    return state


def adam_state_from_lazy(state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """torch Adam(0, beta2) per-parameter state ({name: {"step", "exp_avg", "exp_avg_sq"}}) from a
    `LazyAdam.state_dict()` of `build_lazy_adam`, e.g. a sparse-step checkpoint resumed on the dense step.

    Pending decays are applied (as `LazyAdam.finalize` does); `exp_avg` is zeros, which torch's next step
    overwrites with the gradient exactly when beta1 = 0.
    """
    step = int(state["step"])
    decay = torch.tensor(float(state["beta2"]), dtype=torch.float64).pow(step - state["latent_last_step"].cpu())
    out = {}
    for name, dim in LATENT_DIMS.items():
        v = state[f"{name}.exp_avg_sq"].clone()
        if dim is not None:
            shape = [1] * v.dim()
            shape[dim] = -1
            v.mul_(decay.to(v.device, v.dtype).view(shape))
        out[name] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(v), "exp_avg_sq": v}
    return out


@torch.no_grad()
def sparse_train_step(
    model: JumpReLUSAE,
    optimizer: LazyAdam,
    x: Tensor,
    lr: float,
    objective: Objective,
    max_grad_norm: float,
    *,
    threshold_floor: float = THRESHOLD_FLOOR,
    capacity: int | None = None,
    window_capacity: int | None = None,
    blocks: Blocks | None = None,
) -> SparseUpdate:
    """One training step, identical in mathematics to `sae.dense_step.DenseStep`, touching only the touched latents.

    Args:
        model: the SAE (fp32 parameters, on CUDA, or CPU under TRITON_INTERPRET=1); its `.grad`s stay None.
            Its `compute_dtype` (e.g. torch.bfloat16) is the kernels' product operand dtype.
        optimizer: from `build_lazy_adam(model, ...)`.
        x: [B, D] a batch, already scaled.
        lr: this step's learning rate; objective: this step's loss (its coefficient warmed up for this step),
            any `sae.objectives.Objective`, TERM's tilt included.
        max_grad_norm: clip the global gradient norm to it; <= 0 or inf: no clipping (the norm is still
            reported).
        threshold_floor: thresholds are clamped to at least this after the step.
        capacity, window_capacity, blocks: passed to the kernels (`kernels.sae_step.sae_forward_sparse`).
    """
    from kernels.sae_pipeline import Blocks
    from kernels.sparse_grads import sparse_loss_and_grads

    cache = model.operand_cache
    out = sparse_loss_and_grads(
        x, model.W_enc, model.b_enc, model.W_dec, model.b_dec, model.threshold, model.bandwidth,
        objective, compute_dtype=model.compute_dtype,
        operands=None if cache is None else cache.get(model),
        capacity=capacity, window_capacity=window_capacity, blocks=blocks or Blocks(),
    )  # fmt: skip
    touched = out.touched
    grads = out.grads._asdict()

    # Remove from each touched W_dec row's gradient its component parallel to the row (untouched: zero).
    rows = model.W_dec.index_select(0, touched)
    grads["W_dec"].sub_((grads["W_dec"] * rows).sum(dim=1, keepdim=True) * rows)

    # clip_grad_norm_: norm of the per-parameter norms, in model.parameters() order; the untouched latents'
    # zero gradients add nothing, so this is the dense norm. The scale is applied even when it is 1 (exact).
    ordered = [grads[name] for name, _ in model.named_parameters()]
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ordered]))
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    scale = torch.clamp(max_norm / (grad_norm + 1e-6), max=1.0)
    for g in ordered:
        g.mul_(scale)
    check_step_values({"loss": out.terms.total, "gradient norm": grad_norm})  # before any parameter moves

    optimizer.step(grads, touched, lr)

    rows = model.W_dec.index_select(0, touched)
    model.W_dec.index_copy_(0, touched, rows / rows.norm(dim=1, keepdim=True))
    model.threshold.index_copy_(0, touched, model.threshold.index_select(0, touched).clamp_(min=threshold_floor))
    if cache is not None:  # only the touched latents of W_enc and W_dec were written
        cache.refresh(model, touched)

    explained = explained_variance(x.float(), out.x_hat)
    loss = out.terms
    stats = SparseStepStats(
        loss.total.item(), loss.reconstruction.item(), loss.sparsity.item(), out.l0.mean().item(), explained.item(),
        grad_norm.item(), loss.mse.item(),
    )  # fmt: skip
    return SparseUpdate(stats, out.indices, out.values.to(x.dtype), out.reruns, int(out.l0.max().item()))


class SparseStep:
    """`sae.steps.TrainStep` on the Triton kernels: `sparse_train_step` with a `LazyAdam` (Adam beta1 = 0).

    It also sizes the fused encode's slots per row from the previous batch: 25% above its largest L0, so an
    overflow (a second encode) stays rare while the compact lists stay small.
    """

    def __init__(self, model: JumpReLUSAE, optim: OptimConfig):
        if optim.adam_beta1 != 0.0:
            raise ValueError(f"the sparse step needs Adam beta1 = 0; got {optim.adam_beta1}")
        self.model = model
        self.max_grad_norm = optim.max_grad_norm
        self.optimizer = build_lazy_adam(model, optim.adam_beta2, optim.adam_eps)
        self.capacity: int | None = None  # None: the kernel's default for the first batch

    def __call__(self, x: Tensor, lr: float, objective: Objective) -> StepResult:
        step = sparse_train_step(
            self.model, self.optimizer, x, lr, objective, self.max_grad_norm, capacity=self.capacity
        )
        self.capacity = min(self.model.d_sae, max(8, math.ceil(1.25 * step.max_l0)))
        st = step.stats
        return StepResult(
            st.loss,
            st.reconstruction,
            st.mse,
            st.sparsity,
            st.l0,
            st.explained_variance,
            st.grad_norm,
            float(step.reruns),
            step.indices,
            step.values,
        )

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{SPARSE_PREFIX}{k}": v for k, v in self.optimizer.state_dict().items()}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """LazyAdam state from "lazy_adam." tensors, or converted exactly from the dense step's "optim." ones."""
        by_name, lazy = saved_optimizer_state(tensors)
        self.optimizer.load_state_dict(lazy or lazy_state_from_adam(self.optimizer, by_name))
