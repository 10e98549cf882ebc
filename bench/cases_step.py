"""The whole SAE training step: forward, loss, backward, decoder-gradient projection, clipping, Adam(0, 0.999),
renormalisation and threshold clamp, as `Trainer.train_step` runs it.

Implementations: `triton` (`sae.sparse_step.sparse_train_step` with `LazyAdam`, the trainer's path on CUDA,
with the encode capacity adapted after each step as the trainer does), `reference` (the dense branch of
`Trainer.train_step`, line for line: `dense_step` below) and `compile` (torch.compile of it; its
data-dependent top-k width becomes a dynamic size after the second value, as torch.compile does by default).
Target-L0 objective (lambda 1, target K), lr 1e-3 (the offline default run's), gradient clipping at 1.0.

Check (on the first `check_rows` rows): the float64 and float32 oracles are `dense_step` on the sub-SAE of
the latents that fire or have a window pair in those rows (every other latent has exactly zero gradient,
so it cannot move, and it adds nothing to the loss, the L0 or the gradient norm); this keeps a float64 step
affordable at F = 2^20. Compared with the precision rule: the statistics the step returns, every parameter
after the step on those latents, and that every other latent did not move; for `triton` also the compact
gradients of `kernels.sparse_grads.sparse_loss_and_grads` against autograd's (before Adam, whose first step
is nearly sign(gradient) and would hide a wrong magnitude), and for the dense ones the projected, clipped
gradients left in `.grad`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bench import counts
from bench.checks import Check, Comparison, scaled_err
from bench.registry import SAE_SIZES, Case, profiles_for
from bench.runner import Env, Workload
from bench.synthetic import SAEData, capacity_after
from sae.model import PARAM_NAMES, THRESHOLD_FLOOR, JumpReLUSAE
from sae.objectives import sae_loss
from sae.sparse_step import LATENT_DIMS

LR, COEFFICIENT, MAX_NORM, BETA2, ADAM_EPS = 1e-3, 1.0, 1.0, 0.999, 1e-8
STATS = ("loss", "reconstruction", "sparsity", "l0", "explained_variance", "grad_norm")
_CHUNK = 2**16


def dense_step(model: JumpReLUSAE, optimizer: torch.optim.Optimizer, x: Tensor, target_l0: float,
               step: Callable | None = None) -> list[float]:
    """`Trainer.train_step`'s dense branch, line for line (constant lr and coefficient); `step`: a compiled
    `dense_step_tensors`. The statistics are read back (`.item()`) outside the compiled region: a float on
    the stack after a graph break would make torch.compile recompile on every step."""
    return [t.item() for t in (step or dense_step_tensors)(model, optimizer, x, target_l0)]


def dense_step_tensors(model: JumpReLUSAE, optimizer: torch.optim.Optimizer, x: Tensor,
                       target_l0: float) -> list[Tensor]:
    """The step itself; returns the statistics as 0-dim tensors (STATS order)."""
    for group in optimizer.param_groups:
        group["lr"] = LR
    out = model(x)
    loss = sae_loss(x, out.x_hat, out.l0, "target_l0", COEFFICIENT, target_l0)
    optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    model.project_decoder_grad()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    optimizer.step()
    with torch.no_grad():
        model.normalize_decoder()
        model.threshold.clamp_(min=THRESHOLD_FLOOR)
        ev = 1.0 - (x - out.x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()
    return [loss.total.detach(), loss.reconstruction.detach(), loss.sparsity.detach(), out.l0.detach().mean(), ev,
            grad_norm]


def _model(data: SAEData, backend: str, latents: Tensor | None = None,
           dtype: torch.dtype = torch.float32) -> JumpReLUSAE:
    """A fresh SAE holding the data's parameters (only `latents`' if given), built on the data's device."""
    F = data.shape.F if latents is None else latents.numel()
    with torch.device(data.x.device):
        model = JumpReLUSAE(data.shape.D, F, data.shape.eps, backend).to(dtype)
    with torch.no_grad():
        for name, value in data.params().items():
            dim = LATENT_DIMS[name]
            getattr(model, name).copy_(value if latents is None or dim is None else value.index_select(dim, latents))
    return model


def _adam(model: JumpReLUSAE) -> torch.optim.Adam:
    return torch.optim.Adam([getattr(model, n) for n in PARAM_NAMES], lr=LR, betas=(0.0, BETA2), eps=ADAM_EPS)


class _Stepper:
    """One implementation's step on one model, as a zero-argument callable returning the statistics."""

    def __init__(self, impl: str, data: SAEData, x: Tensor, target_l0: float):
        self.impl, self.x, self.target = impl, x, target_l0
        self.model = _model(data, "triton" if impl == "triton" else "reference")
        self.capacity: int | None = None
        if impl == "triton":
            from sae.sparse_step import build_lazy_adam

            self.optimizer = build_lazy_adam(self.model, BETA2, ADAM_EPS)
        else:
            self.optimizer = _adam(self.model)
            self.compiled = torch.compile(dense_step_tensors) if impl == "compile" else None

    def __call__(self) -> list[float]:
        if self.impl != "triton":
            return dense_step(self.model, self.optimizer, self.x, self.target, self.compiled)
        from sae.sparse_step import sparse_train_step

        step = sparse_train_step(self.model, self.optimizer, self.x, LR, "target_l0", COEFFICIENT, self.target,
                                 MAX_NORM, capacity=self.capacity)
        self.capacity = capacity_after(step.max_l0, self.model.d_sae)  # as Trainer.train_step does
        return list(step.stats)


def _moved_outside(p: Tensor, p0: Tensor, latents: Tensor, dim: int) -> float:
    """max |p - p0| over the latents not in `latents` (along `dim`), relative to max |p0|, in chunks."""
    keep = torch.ones(p.shape[dim], dtype=torch.bool, device=p.device)
    keep[latents] = False
    worst = 0.0
    for c0 in range(0, p.shape[dim], _CHUNK):
        n = min(_CHUNK, p.shape[dim] - c0)
        diff = (p.narrow(dim, c0, n) - p0.narrow(dim, c0, n)).abs()
        sel = keep[c0:c0 + n]
        diff = diff[sel] if dim == 0 else diff[:, sel]
        if diff.numel():
            worst = max(worst, diff.max().item())
    return worst / (p0.abs().max().item() or 1.0)


def _check_step(size: str, impl: str) -> Callable[[Env], Check]:
    def check(env: Env) -> Check:
        shape = env.check_shape(SAE_SIZES[size], impl == "triton")
        data = env.sae_data(shape)
        R_, S, K = data.check_rows, data.check_touched, float(shape.K)
        x = data.x[:R_].contiguous()
        cmp = Comparison(f"B={R_} D={shape.D} F={shape.F}")
        refs = {}
        for dtype in (torch.float32, torch.float64):  # the oracles, on the sub-SAE of touched latents S
            sub = _model(data, "reference", S, dtype)
            out = sub(x.to(dtype))
            loss = sae_loss(x.to(dtype), out.x_hat, out.l0, "target_l0", COEFFICIENT, K)
            leaves = [getattr(sub, n) for n in PARAM_NAMES]
            grads = torch.autograd.grad(loss.total, leaves, allow_unused=True)
            raw = {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(PARAM_NAMES, leaves, grads)}
            sub = _model(data, "reference", S, dtype)
            stats = dense_step(sub, _adam(sub), x.to(dtype), K)
            refs[dtype] = (raw, stats, {n: getattr(sub, n).detach() for n in PARAM_NAMES},
                           {n: getattr(sub, n).grad for n in PARAM_NAMES})
        (raw32, stats32, params32, grads32), (raw64, stats64, params64, grads64) = refs.values()

        if impl == "triton":
            from kernels.sparse_grads import sparse_loss_and_grads

            p = data.params()
            compact = sparse_loss_and_grads(x, *(p[n] for n in PARAM_NAMES), shape.eps, "target_l0", COEFFICIENT, K)
            cmp.exact("touched latents", compact.touched, S)
            if compact.touched.shape == S.shape:
                for name in PARAM_NAMES:
                    cmp.rule(f"gradient {name}", compact.grads._asdict()[name], raw32[name], raw64[name])
        stepper = _Stepper(impl, data, x, K)
        stats = stepper()
        for name, got, r32, r64 in zip(STATS, stats, stats32, stats64):
            cmp.rule(name, got, r32, r64)
        for name in PARAM_NAMES:
            param, dim = getattr(stepper.model, name).detach(), LATENT_DIMS[name]
            picked = param if dim is None else param.index_select(dim, S)
            cmp.rule(f"{name} after the step", picked, params32[name], params64[name])
            if dim is not None:
                cmp.unchanged(f"{name} of untouched latents", _moved_outside(param, data.params()[name], S, dim))
            grad = getattr(stepper.model, name).grad
            if impl != "triton" and grad is not None:
                cmp.rule(f"clipped gradient {name}", grad if dim is None else grad.index_select(dim, S),
                         grads32[name], grads64[name])
        moved = min(scaled_err(params64[n], data.params()[n] if LATENT_DIMS[n] is None
                               else data.params()[n].index_select(LATENT_DIMS[n], S)) for n in PARAM_NAMES)
        return cmp.result(note=f"{S.numel()} touched latents; parameters moved by >= {moved:.1e} (relative)")

    return check


def _prepare_step(size: str, impl: str) -> Callable[[Env], Workload]:
    def prepare(env: Env) -> Workload:
        data = env.sae_data(SAE_SIZES[size])
        B, D, F, K, _ = data.shape
        stepper = _Stepper(impl, data, data.x, float(K))
        if impl == "triton":
            flops, nbytes = counts.step_sparse(B, D, F, data.mean_l0, data.mean_window, data.touched)
        else:
            flops, nbytes = counts.step_dense(B, D, F)
        extra = {"mean_l0": data.mean_l0, "mean_window_pairs": data.mean_window, "touched_latents": data.touched}
        # torch.compile: the reference's active_set reads max L0 back (.item()) and the frame resumed after that
        # graph break is recompiled for each new value up to dynamo's recompile limit (8), then runs eagerly;
        # 12 warm-up steps reach that steady state before timing.
        return Workload(stepper, flops, nbytes, B, min_warmup=12 if impl == "compile" else 2, extra=extra,
                        note=f"L0 {data.mean_l0:.1f}, {data.touched} touched")

    return prepare


def cases() -> list[Case]:
    needs = {"triton": "triton", "compile": "compile", "reference": "torch"}
    return [Case("step", size, impl, _check_step(size, impl), _prepare_step(size, impl), profiles_for(size, impl),
                 needs[impl])
            for size in SAE_SIZES for impl in ("triton", "reference", "compile")]
