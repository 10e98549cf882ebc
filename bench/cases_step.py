"""The whole SAE training step: forward, loss, backward, decoder-gradient projection, clipping, Adam(0, 0.999),
renormalisation and threshold clamp, as the trainer's steps (sae/dense_step.py, sae/sparse_step.py) run it.

Implementations (the performance targets are stated for bf16: the `-bf16` cases measure them):

    triton          `sae.sparse_step.sparse_train_step` with `LazyAdam`, the trainer's path on CUDA, with the encode
                    capacity adapted after each step as the trainer does
    reference       the trainer's dense step, `sae.dense_step.dense_update` (`dense_step` below)
    compile         torch.compile of it (its data-dependent top-k width becomes a dynamic size after the second
                    value, as torch.compile does by default)
    triton-bf16     the same sparse step with the model's compute_dtype = torch.bfloat16: x, W_enc and W_dec enter
                    every product of the kernels as bf16 (the encode's tensor-core products, the decoder-row
                    gathers of decode and backward, the latent-major gradient products), W_enc and W_dec from the
                    bf16 copies kept in `model.operand_cache` and re-rounded at the touched latents after each
                    step; every sum, the loss, the gradients, LazyAdam and the parameters (masters) stay fp32
    reference-bf16  the dense reference step as a user runs it in bf16 on a GPU: its forward and loss under
                    torch.autocast(device type, dtype=torch.bfloat16), backward and optimizer after it, fp32 master
                    weights. Autocast runs the six [B, F] x [F, D]-sized matrix products in bf16 (tensor cores,
                    fp32 accumulation): (x - b_dec) W_enc and f W_dec in the forward, dL/dx_hat W_dec^T,
                    f^T dL/dx_hat, (x - b_dec)^T dL/dz and dL/dz W_enc^T in the backward, each with its operands
                    cast to bf16 (W_enc and W_dec once per step, the forward's casts reused by the backward) and
                    its output rounded to bf16. Everything else runs in fp32: x - b_dec, the + b_enc and + b_dec
                    (so z, f and x_hat are fp32 tensors), the JumpReLU and its straight-through threshold gradient,
                    L0, the loss, every reduction outside the products, the gradients accumulated into fp32
                    `.grad`, projection, clipping, Adam and renormalisation
    compile-bf16    torch.compile of reference-bf16 (the autocast region inside the compiled function)

Speed-ups: the fp32 cases over reference and compile, the bf16 cases over reference-bf16 and compile-bf16. A
16-bit dtype other than bf16 (float16, which Triton's CPU interpreter can run) makes the same cases by
`step_case(size, kind, torch.float16)`: the tests check the bf16 code path that way on the CPU.
Target-L0 objective (lambda 1, target K), lr 1e-3 (the offline default run's), gradient clipping at 1.0.

Checks, on the first rows of the case's data. The oracles are `dense_step` on the sub-SAE of the latents that
fire or have a window pair in those rows (every other latent has exactly zero gradient, so it cannot move, and
it adds nothing to the loss, the L0 or the gradient norm); this keeps a float64 step affordable at F = 2^20.

- triton, reference, compile, triton-bf16: against the float32 and float64 oracles that round at the same
  points (for triton-bf16 the reference backend at compute_dtype = bf16, which rounds the same operands and
  keeps fp32 storage; its decisions are those of `SAEData.check_latents(bf16)`), by the precision rule of
  bench/checks.py (the gradients with the magnitudes of `bench.checks.step_magnitudes`, like the kernel tests'
  gradients; the statistics and parameters with S, which their magnitudes would only loosen, ~700 times for the
  loss at the offline size, where torch's own error is not small by luck): the statistics the step returns,
  every parameter after the step on those latents, and that every other latent did not move; for the sparse
  step also its touched latents (exactly) and the compact gradients of `kernels.sparse_grads.
  sparse_loss_and_grads` against autograd's (before Adam, whose first step is nearly sign(gradient) and would
  hide a wrong magnitude); for the dense ones the projected, clipped gradients left in `.grad`.
- reference-bf16, compile-bf16 (autocast rounds at points no oracle shares): against the exact (float64)
  reference step, in the setting of `bench.synthetic.wide_window` (a wider STE window and moved thresholds,
  where autocast takes the exact decisions), by the bound derived in `autocast_allowed`; the parameters after
  the step against torch's update replayed on the step's own clipped gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from bench import counts
from bench.checks import U32, UNIT, Check, Comparison, scaled_err, step_magnitudes
from bench.env import Env, Workload
from bench.registry import Case, profiles_for
from bench.shapes import SAE_SIZES
from bench.synthetic import capacity_after, wide_window
from sae.dense_step import apply_update, dense_update
from sae.model import PARAM_NAMES, JumpReLUSAE
from sae.objectives import Objective, sae_loss
from sae.sparse_step import LATENT_DIMS

LR, COEFFICIENT, MAX_NORM, BETA2, ADAM_EPS = 1e-3, 1.0, 1.0, 0.999, 1e-8
STATS = ("loss", "reconstruction", "sparsity", "l0", "explained_variance", "grad_norm")
KINDS = ("triton", "reference", "compile")
SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16"}  # impl suffix and Workload dtype of a 16-bit case
AUTOCAST_ROWS = 128  # check rows of the autocast cases (`wide_window` must find thresholds clear of them all)
AUTOCAST_ROUNDINGS = 12  # see `autocast_allowed`
_NEEDS = {"triton": "triton", "compile": "compile", "reference": "torch"}
_CHUNK = 2**16


def dense_step(
    model: JumpReLUSAE,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    target_l0: float,
    step: Callable | None = None,
    autocast: torch.dtype | None = None,
) -> list[float]:
    """The trainer's dense step (`sae.dense_step.dense_update`) at a constant lr and coefficient; `step`: a
    compiled `dense_step_tensors`. The statistics are read back (`.item()`) outside the compiled region: a float
    on the stack after a graph break would make torch.compile recompile on every step."""
    return [t.item() for t in (step or dense_step_tensors)(model, optimizer, x, target_l0, autocast)]


def dense_step_tensors(
    model: JumpReLUSAE,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    target_l0: float,
    autocast: torch.dtype | None = None,
) -> list[Tensor]:
    """`dense_update` without its non-finite guard (a host synchronisation; the check verifies finiteness
    itself); returns the statistics as 0-dim tensors (STATS order). autocast: the forward and the loss under
    torch.autocast(x's device type, dtype=autocast), the usual mixed-precision recipe."""
    objective = Objective("target_l0", COEFFICIENT, target_l0)
    u = dense_update(model, optimizer, x, LR, objective, MAX_NORM, autocast=autocast, guard=None)
    loss = u.loss
    return [
        loss.total.detach(),
        loss.reconstruction.detach(),
        loss.sparsity.detach(),
        u.forward.l0.detach().mean(),
        u.explained_variance,
        u.grad_norm,
    ]


def _model(
    params: dict[str, Tensor],
    eps: float,
    backend: str,
    latents: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype | None = None,
) -> JumpReLUSAE:
    """A fresh SAE holding `params` (only `latents`' if given), built on their device."""
    D, F = params["W_enc"].shape
    F = F if latents is None else latents.numel()
    with torch.device(params["W_enc"].device):
        model = JumpReLUSAE(D, F, eps, backend, compute_dtype).to(dtype)
    with torch.no_grad():
        for name, value in _pick(params, latents).items():
            getattr(model, name).copy_(value)
    return model


def _pick(params: dict[str, Tensor], latents: Tensor | None) -> dict[str, Tensor]:
    """The parameters (or gradients) of `latents` only (all of them if None)."""
    if latents is None:
        return dict(params)
    return {n: v if LATENT_DIMS[n] is None else v.index_select(LATENT_DIMS[n], latents) for n, v in params.items()}


def _adam(model: JumpReLUSAE) -> torch.optim.Adam:
    return torch.optim.Adam([getattr(model, n) for n in PARAM_NAMES], lr=LR, betas=(0.0, BETA2), eps=ADAM_EPS)


class _Stepper:
    """One implementation's step on one model, as a zero-argument callable returning the statistics.

    low: the 16-bit dtype of a `-bf16` (`-fp16`) case: the sparse step's compute_dtype, the dense step's autocast.
    """

    def __init__(
        self,
        kind: str,
        params: dict[str, Tensor],
        eps: float,
        x: Tensor,
        target_l0: float,
        low: torch.dtype | None = None,
    ):
        self.kind, self.x, self.target = kind, x, target_l0
        triton = kind == "triton"
        self.autocast = None if triton else low
        self.model = _model(params, eps, "triton" if triton else "reference", compute_dtype=low if triton else None)
        self.capacity: int | None = None
        if triton:
            from sae.sparse_step import build_lazy_adam

            self.optimizer = build_lazy_adam(self.model, BETA2, ADAM_EPS)
        else:
            self.optimizer = _adam(self.model)
            self.compiled = torch.compile(dense_step_tensors) if kind == "compile" else None

    def __call__(self) -> list[float]:
        if self.kind != "triton":
            return dense_step(self.model, self.optimizer, self.x, self.target, self.compiled, self.autocast)
        from sae.sparse_step import sparse_train_step

        objective = Objective("target_l0", COEFFICIENT, self.target)
        step = sparse_train_step(self.model, self.optimizer, self.x, LR, objective, MAX_NORM, capacity=self.capacity)
        self.capacity = capacity_after(step.max_l0, self.model.d_sae)  # as sae.sparse_step.SparseStep does
        return list(step.stats)


class _Oracle(NamedTuple):
    """`dense_step` on a sub-SAE, in one dtype."""

    raw: dict[str, Tensor] | None  # autograd's gradients before projection and clipping
    stats: list[float]
    params: dict[str, Tensor]  # after the step
    clipped: dict[str, Tensor]  # `.grad` after the step: projected and clipped


def _oracle(
    params: dict[str, Tensor],
    eps: float,
    latents: Tensor,
    x: Tensor,
    K: float,
    dtype: torch.dtype,
    compute_dtype: torch.dtype | None = None,
    raw: bool = True,
) -> _Oracle:
    sub = _model(params, eps, "reference", latents, dtype, compute_dtype)
    xs = x.to(dtype)
    grads = None
    if raw:
        out = sub(xs)
        loss = sae_loss(xs, out.x_hat, out.l0, "target_l0", COEFFICIENT, K)
        leaves = [getattr(sub, n) for n in PARAM_NAMES]
        found = torch.autograd.grad(loss.total, leaves, allow_unused=True)
        grads = {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(PARAM_NAMES, leaves, found)}
        sub = _model(params, eps, "reference", latents, dtype, compute_dtype)
    stats = dense_step(sub, _adam(sub), xs, K)
    return _Oracle(
        grads, stats, {n: getattr(sub, n).detach() for n in PARAM_NAMES}, {n: getattr(sub, n).grad for n in PARAM_NAMES}
    )


def _moved_outside(p: Tensor, p0: Tensor, latents: Tensor, dim: int) -> float:
    """max |p - p0| over the latents not in `latents` (along `dim`), relative to max |p0|, in chunks."""
    keep = torch.ones(p.shape[dim], dtype=torch.bool, device=p.device)
    keep[latents] = False
    worst = 0.0
    for c0 in range(0, p.shape[dim], _CHUNK):
        n = min(_CHUNK, p.shape[dim] - c0)
        diff = (p.narrow(dim, c0, n) - p0.narrow(dim, c0, n)).abs()
        sel = keep[c0 : c0 + n]
        diff = diff[sel] if dim == 0 else diff[:, sel]
        if diff.numel():
            worst = max(worst, diff.max().item())
    return worst / (p0.abs().max().item() or 1.0)


def _untouched_and_moved(
    cmp: Comparison, model: JumpReLUSAE, p0: dict[str, Tensor], S: Tensor, after64: dict[str, Tensor]
) -> float:
    """Record that no latent outside S moved; return how far the oracle's parameters moved (relative, the least)."""
    for name in PARAM_NAMES:
        if LATENT_DIMS[name] is not None:
            cmp.unchanged(
                f"{name} of untouched latents",
                _moved_outside(getattr(model, name).detach(), p0[name], S, LATENT_DIMS[name]),
            )
    start = _pick(p0, S)
    return min(scaled_err(after64[n], start[n]) for n in PARAM_NAMES)


def _check_step(size: str, kind: str, low: torch.dtype | None) -> Callable[[Env], Check]:
    """The precision rule against oracles that round where the implementation does (module docstring)."""
    cd = low if kind == "triton" else None

    def check(env: Env) -> Check:
        shape = env.check_shape(SAE_SIZES[size], kind == "triton")
        data = env.sae_data(shape)
        R_, S, K = data.check_rows, data.check_latents(cd), float(shape.K)
        x, p0 = data.x[:R_].contiguous(), data.params()
        o32, o64 = (_oracle(p0, shape.eps, S, x, K, dtype, cd) for dtype in (torch.float32, torch.float64))
        M = step_magnitudes(x, _pick(p0, S), shape.eps, K, COEFFICIENT, cd, MAX_NORM, o64.stats[5], o64.clipped)
        cmp = Comparison(f"B={R_} D={shape.D} F={shape.F}" + (f", {SHORT[cd]} operands" if cd else ""))

        if kind == "triton":
            from kernels.sparse_grads import sparse_loss_and_grads

            compact = sparse_loss_and_grads(
                x, *(p0[n] for n in PARAM_NAMES), shape.eps, Objective("target_l0", COEFFICIENT, K), compute_dtype=cd
            )
            cmp.exact("touched latents", compact.touched, S)
            if compact.touched.shape == S.shape:
                for name in PARAM_NAMES:
                    cmp.rule(
                        f"gradient {name}",
                        compact.grads._asdict()[name],
                        o32.raw[name],
                        o64.raw[name],
                        M[f"gradient {name}"],
                    )
        stepper = _Stepper(kind, p0, shape.eps, x, K, low)
        stats = stepper()
        for name, got, r32, r64 in zip(STATS, stats, o32.stats, o64.stats):
            cmp.rule(name, got, r32, r64)
        for name in PARAM_NAMES:
            param = getattr(stepper.model, name)
            cmp.rule(
                f"{name} after the step", _pick({name: param.detach()}, S)[name], o32.params[name], o64.params[name]
            )
            if kind != "triton" and param.grad is not None:
                cmp.rule(
                    f"clipped gradient {name}",
                    _pick({name: param.grad}, S)[name],
                    o32.clipped[name],
                    o64.clipped[name],
                    M[f"clipped gradient {name}"],
                )
        moved = _untouched_and_moved(cmp, stepper.model, p0, S, o64.params)
        return cmp.result(note=f"{S.numel()} touched latents; parameters moved by >= {moved:.1e} (relative)")

    return check


def _gamma(n: float, unit: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error of n roundings of unit roundoff u, compounded."""
    return n * unit / (1.0 - n * unit)


def autocast_allowed(name: str, low: torch.dtype, rows: int, D: int, T: int) -> float:
    """The bound on an output's error relative to its largest value S, max_e |y_autocast - y_exact|_e / S, of the
    autocast step against the exact one when both take the same decisions (`bench.synthetic.wide_window`):

        gamma_n(UNIT) + gamma_N(u32),   n = AUTOCAST_ROUNDINGS = 12 (0 for L0 and the sparsity term),
                                        N = 2 (rows + D + T) + 8, UNIT = 2^-8 for bf16, u32 = 2^-24:  0.049 for bf16

    Autocast rounds to `low` the operands of each product and its output, each a relative error of at most UNIT.
    Roundings on the longest chain to each compared output:

        x_hat      r(x - b_dec), r(W_enc), the product z - b_enc, r(f), r(W_dec), the product x_hat - b_dec   6
        dL/dx_hat  2 (x_hat - x) / B, fp32                                                                   6
        loss, reconstruction, explained variance: squares of x - x_hat (the relative error doubles)        12
        dL/df      r(dL/dx_hat) (7), r(W_dec), the product's output; so dz, d theta and d b_enc              9
        d W_dec    r(f)^T r(dL/dx_hat): 4 + 7, the output                                                    12
        d W_enc    r(x - b_dec)^T r(dz): 1 + 10, the output                                                  12
        d b_dec    sum_b dL/dx_hat - sum_b r(r(dz) r(W_enc)^T): 10 + 1, the output                           12
        grad_norm, the clipped gradients: the gradients' 12 (the clip scale is one factor of the norm)
        L0, sparsity term: counts of the same decisions, untouched by the rounding

    The fp32 accumulations add gamma_N(u32) over the longest chain of N roundings (bench/checks.py). Relative to
    S, not elementwise: the rigorous elementwise bound, gamma_n(UNIT) M_e with M the sum of |terms|
    (`bench.checks.step_magnitudes`), is vacuous here (M / S is ~70 for the gradients and ~700 for the loss at the
    offline size: a sum of random-sign terms grows like the square root of their count, M linearly). The rounding
    errors have random signs as well (Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019): an output's error is a
    sum of the output's own terms, each scaled by at most n UNIT, so about sqrt(n / 3) UNIT (2 UNIT) times the
    size of the output where the n roundings are independent, and at most n UNIT times it where they coincide
    (one rounded operand in every term): at most n UNIT S over the elements. Measured (CPU autocast, 128 rows):
    0.8 UNIT S at the tiny and offline sizes, 3.1 UNIT S at D = 2304, F = 16384 (the gradients; the statistics
    below 0.2 UNIT S), 4 times inside. Summing in bf16 would add ~sqrt(N) UNIT (0.3 at the offline size), and a
    flipped decision 0.05 to 1.1 S (the offline step at eps = 0.001, 46 active pairs flipped): both caught.
    """
    n = 0 if name in ("l0", "sparsity") else AUTOCAST_ROUNDINGS
    return _gamma(n, UNIT[low]) + _gamma(2 * (rows + D + T) + 8, U32)


def _replay(
    params: dict[str, Tensor], eps: float, S: Tensor, grads: dict[str, Tensor], dtype: torch.dtype
) -> dict[str, Tensor]:
    """`apply_update` on the sub-SAE of S with the given clipped gradients, in `dtype`: the parameters after it."""
    sub = _model(params, eps, "reference", S, dtype)
    for name in PARAM_NAMES:
        getattr(sub, name).grad = grads[name].to(dtype)
    apply_update(sub, _adam(sub))
    return {n: getattr(sub, n).detach() for n in PARAM_NAMES}


@contextlib.contextmanager
def full_precision_reductions():
    """cuBLAS sums 16-bit products in fp32 throughout, without the reduced-precision split-K reductions torch
    allows by default (extra 16-bit roundings of partial sums that `wide_window`'s delta does not bound)."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction = saved


def _check_autocast(size: str, kind: str, low: torch.dtype) -> Callable[[Env], Check]:
    """The autocast step against the exact (float64) step in `wide_window`'s setting, by `autocast_allowed`: the
    statistics and the clipped gradients left in `.grad`. The parameters after the step by the precision rule,
    against torch's update (`apply_update`) replayed in float32 and float64 on the step's own clipped gradients:
    Adam's first step is about lr sign(gradient), so a gradient within its rounding bound of zero may flip an
    update by 2 lr, which no rounding bound on the parameters expresses; the replay checks that the fp32 update
    ran on what the backward produced, and the gradients themselves are bounded. The checked step runs with
    `full_precision_reductions` (the timed one with torch's defaults)."""

    def check(env: Env) -> Check:
        data = env.sae_data(SAE_SIZES[size])
        shape = data.shape
        ww = wide_window(data, min(data.check_rows, AUTOCAST_ROWS), low)
        S, K, x = ww.touched, float(shape.K), data.x[: ww.rows].contiguous()
        p0 = dict(data.params(), threshold=ww.threshold)
        o64 = _oracle(p0, ww.eps, S, x, K, torch.float64, raw=False)
        cmp = Comparison(f"B={ww.rows} D={shape.D} F={shape.F}, eps {ww.eps:g}, autocast {SHORT[low]}")

        def bound(name: str, got: Tensor | float, ref: Tensor | float) -> None:
            cmp.within(name, scaled_err(got, ref), autocast_allowed(name, low, ww.rows, shape.D, S.numel()))

        stepper = _Stepper(kind, p0, ww.eps, x, K, low)
        with full_precision_reductions():
            stats = stepper()
        for name, got, ref in zip(STATS, stats, o64.stats):
            bound(name, got, ref)
        model = stepper.model
        clipped = {n: getattr(model, n).grad for n in PARAM_NAMES}
        if any(g is None for g in clipped.values()):
            cmp.fail("a parameter has no gradient after the step")
            return cmp.result()
        clipped = _pick(clipped, S)
        for name in PARAM_NAMES:
            bound(f"clipped gradient {name}", clipped[name], o64.clipped[name])
        r32, r64 = (_replay(p0, ww.eps, S, clipped, dtype) for dtype in (torch.float32, torch.float64))
        for name in PARAM_NAMES:
            cmp.rule(
                f"{name} after the step (update of its gradients)",
                _pick({name: getattr(model, name).detach()}, S)[name],
                r32[name],
                r64[name],
            )
        moved = _untouched_and_moved(cmp, model, p0, S, o64.params)
        return cmp.result(
            note=f"checked at STE bandwidth {ww.eps:g} (each pre-activation >= its autocast error "
            f"bound, at most {ww.delta:.1e}, from every boundary: the exact decisions), "
            f"{S.numel()} touched latents; parameters moved by >= {moved:.1e} (relative)"
        )

    return check


def _prepare_step(size: str, kind: str, low: torch.dtype | None) -> Callable[[Env], Workload]:
    def prepare(env: Env) -> Workload:
        data = env.sae_data(SAE_SIZES[size])
        B, D, F, K, eps = data.shape
        stepper = _Stepper(kind, data.params(), eps, data.x, float(K), low)
        elt = 4 if low is None else low.itemsize
        if kind == "triton":
            flops, nbytes = counts.step_sparse(B, D, F, data.mean_l0, data.mean_window, data.touched, elt)
        else:
            flops, nbytes = counts.step_dense(B, D, F, elt)
        extra = {"mean_l0": data.mean_l0, "mean_window_pairs": data.mean_window, "touched_latents": data.touched}
        note = f"L0 {data.mean_l0:.1f}, {data.touched} touched"
        if low is not None:
            note += f"; {SHORT[low]} operands" if kind == "triton" else f"; autocast {SHORT[low]}"
        # torch.compile: the reference's active_set reads max L0 back (.item()) and the frame resumed after that
        # graph break is recompiled for each new value up to dynamo's recompile limit (8), then runs eagerly;
        # 12 warm-up steps reach that steady state before timing.
        return Workload(
            stepper,
            flops,
            nbytes,
            B,
            "fp32" if low is None else SHORT[low],
            note,
            min_warmup=12 if kind == "compile" else 2,
            extra=extra,
        )

    return prepare


def step_case(size: str, kind: str, low: torch.dtype | None = None, profiles: frozenset[str] | None = None) -> Case:
    """The step case of `kind` ("triton", "reference" or "compile") at `size`; with `low` (torch.bfloat16, or
    torch.float16 for the CPU interpreter's tests) the 16-bit case `<kind>-bf16` (`-fp16`), compared with the
    16-bit reference and compile. profiles: default `registry.profiles_for`."""
    suffix = "" if low is None else f"-{SHORT[low]}"
    impl = kind + suffix
    check = _check_step(size, kind, low) if low is None or kind == "triton" else _check_autocast(size, kind, low)
    return Case(
        "step",
        size,
        impl,
        check,
        _prepare_step(size, kind, low),
        profiles_for(size, impl) if profiles is None else profiles,
        _NEEDS[kind],
        (f"reference{suffix}", f"compile{suffix}"),
        "fp32" if low is None else SHORT[low],
    )


def cases() -> list[Case]:
    return [step_case(size, kind, low) for size in SAE_SIZES for low in (None, torch.bfloat16) for kind in KINDS]
