"""The sparse training step (kernels/sparse_grads.py, sae/sparse_step.py) against the dense one, fp32.

Runs in Triton's interpreter on the CPU when there is no GPU (tests/test_kernels_common.py). Two oracles:

- one step's loss and gradients: `kernels.reference.sae_forward` + the loss + autograd (dense [F, D] grads,
  compacted here by the kernel's `touched`), which must also be exactly zero outside `touched`;
- N steps of training: the trainer's dense step on the reference backend (sae_loss, backward,
  project_decoder_grad, clip_grad_norm_, torch.optim.Adam(betas=(0, 0.999), foreach=False),
  normalize_decoder, threshold clamp), in fp32 and in fp64.

Precision rule (tests/test_kernels_common.py, flash-attention's) applied to the whole trajectory: after every
step, the sparse fp32 run's error against the dense fp64 run, relative to the fp64 value's largest
magnitude, may be at most twice the dense fp32 run's error plus FLOOR = 2^-18 (64 fp32 roundoffs), for
every parameter and every statistic. The rule is meaningful only while all runs take the same discrete
decisions (who fires, who sits in the STE window): before every step, the few tokens that have a
pre-activation nearer a decision boundary than 20 times the measured fp32 error of the pre-activations are
dropped from the batch (`drop_near_boundaries`), for all runs alike.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sae.dense_step import dense_update
from sae.model import JumpReLUSAE
from sae.objectives import Objective, per_token_error
from sae.schedule import lr_at, sparsity_coefficient_at
from sae.sparse_step import (
    LATENT_DIMS,
    THRESHOLD_FLOOR,
    adam_state_from_lazy,
    build_lazy_adam,
    lazy_state_from_adam,
    sparse_train_step,
)
from tests.synthetic import SyntheticActivations
from tests.test_kernels_common import (  # noqa: F401 (poisoned is a fixture); sets TRITON_INTERPRET
    BLOCKS,
    DEVICE,
    FLOOR,
    INTERPRET,
    PARAMS,
    R,
    assert_matches,
    loss_of,
    magnitudes,
    make_case,
    poisoned,
    run,
)

# Nothing above imports a module that defines a Triton kernel (sae.sparse_step imports them when a step
# runs), so tests.test_kernels_common sets the interpreter mode first wherever an import sorter puts it.


# -- one step: compact gradients against autograd --------------------------------------------------------------


class NoNewTensorOfShape(TorchDispatchMode):
    """Record every tensor of a forbidden shape that an aten op allocates (views and in-place results, which
    share an input's storage, are not allocations)."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.hits = {tuple(s) for s in shapes}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            new = isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
            if new and tuple(t.shape) in self.shapes:
                self.hits.append(f"{func} -> {tuple(t.shape)}")
        return out


def fires_and_window(case: dict, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, F] masks, in fp64: active pairs, pairs inside the STE window."""
    c = {k: v.double() for k, v in case.items()}
    z = (c["x"] - c["b_dec"]) @ c["W_enc"] + c["b_enc"]
    u = (z - c["threshold"]) / eps
    return z > c["threshold"], (u > -0.5) & (u < 0.5)


@pytest.mark.parametrize("B, D, F, kind, eps", [(33, 17, 67, "l0", 0.05), (19, 15, 63, "target_l0", 0.25)])
def test_one_step_compact_grads_match_autograd(B, D, F, kind, eps, poisoned):  # noqa: F811
    from kernels.sparse_grads import sparse_loss_and_grads

    case = make_case(B, D, F, seed=B * 1000 + D * 10 + F, eps=eps)
    args = [case["x"], *(case[k] for k in PARAMS)]
    with NoNewTensorOfShape([(F, D), (D, F), (B, F)]) as guard:
        # run()'s loss has lambda 0.3, target 5. Capacities below F: the default min(F, 128) would make the
        # encode's slot buffers [B, F]-shaped at these small F.
        out = sparse_loss_and_grads(
            *args, eps, Objective(kind, 0.3, 5.0), capacity=16, window_capacity=16, blocks=BLOCKS
        )
    assert not guard.hits, guard.hits
    with NoNewTensorOfShape([(F, D), (D, F), (B, F)]) as dense_guard:
        ref32, g32 = run(R.sae_forward, case, eps, kind)
    assert len(dense_guard.hits) >= 3, "the guard does not see the dense path's [B, F] and [F, D] tensors"
    ref64, g64 = run(R.sae_forward, case, eps, kind, torch.float64)

    fires, in_window = fires_and_window(case, eps)
    fired, window = fires.any(0), in_window.any(0)
    assert torch.equal(out.touched.cpu(), (fired | window).nonzero().squeeze(1))
    assert (window & ~fired).any() and (fired & ~window).any(), "the union is not exercised"
    assert (~(fired | window)).any() or kind == "target_l0", "every latent touched: nothing to leave out"
    untouched = (~(fired | window)).nonzero().squeeze(1)
    t = out.touched.cpu()
    mags = magnitudes(case, eps, kind)
    for name in PARAMS:
        dim = LATENT_DIMS[name]
        if dim is not None:  # autograd's gradient is exactly zero outside `touched`
            assert not g64[name].index_select(dim, untouched).any(), name
        r32, r64, m = (g if dim is None else g.index_select(dim, t) for g in (g32[name], g64[name], mags[name]))
        assert_matches(f"d {name}", out.grads._asdict()[name], r32, r64, m)

    x32, x64 = case["x"], case["x"].double()
    assert_matches("x_hat", out.x_hat, ref32.x_hat, ref64.x_hat, mags["x_hat"])
    for what, got, mode in (
        ("reconstruction", out.terms.reconstruction, "mse"),
        ("loss", out.terms.total, kind),
        ("sparsity", out.terms.sparsity, "l0_only" if kind == "l0" else None),
    ):
        if mode is None:  # target_l0's term alone: the loss minus the reconstruction
            r32, r64 = (
                (loss_of(kind, x, r.x_hat, r.l0) - loss_of("mse", x, r.x_hat, r.l0)).detach()
                for x, r in ((x32, ref32), (x64, ref64))
            )
        else:
            r32, r64 = (loss_of(mode, x, r.x_hat, r.l0).detach() for x, r in ((x32, ref32), (x64, ref64)))
        assert_matches(what, got, r32, r64)
    assert torch.equal(out.l0.cpu(), ref32.l0.detach())
    assert torch.equal(out.fire_counts.cpu().long(), fires.sum(0))


TILT = 0.02  # TERM: t (max e - min e) = 2 to 3 on these cases (e = per-token error), tokens weighted 10-20x apart


@pytest.mark.parametrize("B, D, F, kind, eps", [(33, 17, 67, "l0", 0.05), (19, 15, 63, "target_l0", 0.25)])
def test_one_step_with_a_tilted_objective_matches_autograd(B, D, F, kind, eps, poisoned):  # noqa: F811
    """TERM (tilt > 0) on the sparse path: `sparse_loss_and_grads` with a tilted `Objective` against autograd
    through `kernels.reference.sae_forward` + the same `Objective`: every term of the loss and every gradient,
    by the precision rule, with the magnitudes of the tilted weights dL/de_b = softmax(t e)_b."""
    from kernels.sparse_grads import sparse_loss_and_grads

    objective = Objective(kind, 0.3, 5.0, tilt=TILT)
    case = make_case(B, D, F, seed=B * 1000 + D * 10 + F, eps=eps)
    out = sparse_loss_and_grads(case["x"].to(DEVICE), *(case[k].to(DEVICE) for k in PARAMS), eps, objective,
                                capacity=16, window_capacity=16, blocks=BLOCKS)  # fmt: skip

    def reference(dtype):
        t = {k: v.to(DEVICE, dtype, copy=True).requires_grad_(k != "x") for k, v in case.items()}
        ref = R.sae_forward(t["x"], *(t[k] for k in PARAMS), eps)
        loss = objective(per_token_error(t["x"], ref.x_hat), ref.l0)
        loss.total.backward()
        return ref, loss, {k: t[k].grad.cpu() for k in PARAMS}

    (ref32, loss32, g32), (ref64, loss64, g64) = reference(torch.float32), reference(torch.float64)
    errors64 = per_token_error(ref64.x_hat, case["x"].to(DEVICE).double()).detach()
    weights = torch.softmax(TILT * errors64, 0).cpu()
    assert weights.max() > 10 * weights.min() and loss64.reconstruction > 1.05 * loss64.mse, "not tilted"

    assert type(out.terms) is type(loss64) and not any(t.requires_grad for t in out.terms)
    for what, got, r32, r64 in zip(loss64._fields, out.terms, loss32, loss64):
        assert_matches(what, got, r32.detach(), r64.detach())
    fires, in_window = fires_and_window(case, eps)
    touched = fires.any(0) | in_window.any(0)
    t, mags = out.touched.cpu(), magnitudes(case, eps, kind, row_weights=weights)
    assert torch.equal(t, touched.nonzero().squeeze(1))
    for name in PARAMS:
        dim = LATENT_DIMS[name]
        if dim is not None:  # autograd's gradient is exactly zero outside `touched`
            assert not g64[name].index_select(dim, (~touched).nonzero().squeeze(1)).any(), name
        r32, r64, m = (g if dim is None else g.index_select(dim, t) for g in (g32[name], g64[name], mags[name]))
        assert_matches(f"d {name}", out.grads._asdict()[name], r32, r64, m)
    assert_matches("x_hat", out.x_hat, ref32.x_hat.detach(), ref64.x_hat.detach(), mags["x_hat"])


# -- N steps: the sparse trainer step against Trainer.train_step's dense sequence ------------------------------

D, F, B, STEPS = 24, 96, 64, 10
EPS = 0.05  # STE bandwidth: wide enough that some latents sit only in the window
DEAD = torch.arange(90, 96)  # zero encoder columns and b_enc = -1: never fire, never in the window
RARE = torch.arange(80, 90)  # threshold at the largest pre-activation of the init data: touched on some steps
BETA2, ADAM_EPS, TARGET = 0.999, 1e-8, 6.0
COEFFICIENT = {"l0": 0.05, "target_l0": 1.0}
MAX_NORM = 0.05  # well below the gradient norms seen, so every clipped step clips; the others do not clip
# Per-row kernels get one d_in tile (D = 24 <= 32) to keep the interpreter fast; the one-step test above
# runs the small BLOCKS on both sides of every block size.
STEP_BLOCKS = BLOCKS._replace(rows=(16, 32), pairs=(16, 32))


def initial_sae(seed: int) -> tuple[JumpReLUSAE, SyntheticActivations, float]:
    """The trainer's start (activations scaled to E||x||^2 = D, tied init, b_dec = mean, thresholds for an
    initial L0 of 8) from init batches disjoint from the training ones, so that no training pre-activation
    equals a threshold exactly (data-driven thresholds are pre-activations of the init data)."""
    data = SyntheticActivations(d_in=D, n_features=48, batch_size=B, seed=seed)
    x = torch.cat([data.batch(10_000 + i) for i in range(4)])
    scale = float((D / x.pow(2).sum(-1).mean()).sqrt())
    x = x * scale
    model = JumpReLUSAE(D, F, EPS, backend="reference")
    model.init_tied(0.001, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.b_dec.copy_(x.mean(0))
        model.W_enc[:, DEAD] = 0.0
        model.b_enc[DEAD] = -1.0
        model.init_thresholds_for_l0(x, 8.0, floor=THRESHOLD_FLOOR)
        z = (x - model.b_dec) @ model.W_enc + model.b_enc
        model.threshold[RARE] = z[:, RARE].max(0).values
    return model, data, scale


def dense_step(model, optimizer, x, lr, kind, coefficient, max_norm) -> list[float]:
    """The trainer's dense step (`sae.dense_step.dense_update`, reference backend)."""
    u = dense_update(model, optimizer, x, lr, Objective(kind, coefficient, TARGET), max_norm)
    return [
        u.loss.total.item(),
        u.loss.reconstruction.item(),
        u.loss.sparsity.item(),
        u.forward.l0.mean().item(),
        u.explained_variance.item(),
        u.grad_norm.item(),
    ]


def preactivations(model: JumpReLUSAE, x: torch.Tensor) -> torch.Tensor:
    """z as `model` computes it, its compute_dtype's rounding included (kernels.reference.encode)."""
    cd = model.compute_dtype
    return R.operand(R.operand(x, cd) - model.b_dec, cd) @ R.operand(model.W_enc, cd) + model.b_enc


def drop_near_boundaries(x, dense32, dense64) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the tokens that have a pre-activation (fp64 run) nearer a decision boundary (z = theta,
    z = theta +- eps/2) than 20 times the fp32 error of the pre-activations (the fp32 run's against the fp64
    run's, ~4e-7), so that every run takes the same discrete decisions. Returns x and the fp64 z - theta."""
    with torch.no_grad():
        z32 = preactivations(dense32, x)
        z64 = preactivations(dense64, x.double())
        gap = z64 - dense64.threshold
    z_err = (z32.double() - z64).abs().max()
    keep = (torch.minimum(gap.abs(), (gap.abs() - EPS / 2).abs()) > 20 * z_err).all(1)
    return x[keep], gap[keep]


def scaled_err(got: float | torch.Tensor, ref: float | torch.Tensor) -> float:
    got, ref = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    return float((got - ref).abs().max() / (ref.abs().max() if ref.abs().max() > 0 else 1.0))


def check_rule(what: str, sparse, dense32, dense64, report: dict) -> None:
    err, torch_err = scaled_err(sparse, dense64), scaled_err(dense32, dense64)
    report[what] = max(report.get(what, 0.0), err)
    assert err <= 2 * torch_err + FLOOR, f"{what}: error {err:.2e} > 2 x torch fp32 {torch_err:.2e} + {FLOOR:.1e}"


def check_against_dense(result, sparse, fp32, fp64, report) -> None:
    """The sparse step's stats and parameters against the dense step's, in fp32 and fp64, by the precision rule."""
    (s32, dense32), (s64, dense64) = fp32, fp64
    assert result.stats.l0 == s32[3], "the active sets differ"
    for name, a, b, c in zip(result.stats._fields, result.stats, s32, s64):
        check_rule(name, a, b, c, report)
    for name in PARAMS:
        check_rule(
            name,
            getattr(sparse, name).detach().cpu(),
            getattr(dense32, name).detach(),
            getattr(dense64, name).detach(),
            report,
        )


def guarded_sparse_step(sparse, lazy, x, lr, kind, coefficient, max_norm, guard: NoNewTensorOfShape | None):
    """One `sparse_train_step` at the trajectory tests' capacities and tiles, under `guard` (no dense tensor
    allocated) when one is given."""
    with guard or contextlib.nullcontext():
        result = sparse_train_step(
            sparse,
            lazy,
            x.to(DEVICE),
            lr,
            Objective(kind, coefficient, TARGET),
            max_norm,
            capacity=32,
            window_capacity=32,
            blocks=STEP_BLOCKS,
        )
    assert guard is None or not guard.hits, guard.hits
    return result


@pytest.mark.parametrize("kind", ["l0", "target_l0"])
def test_sparse_train_step_matches_dense_trainer_step(kind):
    """Steps alternate between max_grad_norm = MAX_NORM (clipping) and 0 (off), as both are stateless."""
    model0, data, scale = initial_sae(seed=3)
    dense32, sparse = copy.deepcopy(model0), copy.deepcopy(model0).to(DEVICE)
    dense64 = copy.deepcopy(model0).double()
    adam32, adam64 = (
        torch.optim.Adam(m.parameters(), lr=1.0, betas=(0.0, BETA2), eps=ADAM_EPS, foreach=False)
        for m in (dense32, dense64)
    )
    lazy = build_lazy_adam(sparse, BETA2, ADAM_EPS, validate=True)
    report: dict[str, float] = {}
    touched_steps = torch.zeros(F, dtype=torch.int64)
    dropped = 0
    for step in range(STEPS):
        x = data.batch(step) * scale
        lr = lr_at(step, 3e-3, 3, STEPS, 0.2)
        coefficient = sparsity_coefficient_at(step + 1, COEFFICIENT[kind], 3)
        max_norm = MAX_NORM if step % 2 else 0.0

        x, gap = drop_near_boundaries(x, dense32, dense64)
        dropped += B - x.shape[0]
        touched_steps += ((gap > 0) | (gap.abs() < EPS / 2)).any(0).long()

        s32 = dense_step(dense32, adam32, x, lr, kind, coefficient, max_norm)
        s64 = dense_step(dense64, adam64, x.double(), lr, kind, coefficient, max_norm)
        # The allocation guard doubles a step's time in the interpreter: on the last step only.
        guard = NoNewTensorOfShape([(F, D), (D, F), (x.shape[0], F)]) if step == STEPS - 1 else None
        result = guarded_sparse_step(sparse, lazy, x, lr, kind, coefficient, max_norm, guard)
        assert all(p.grad is None for p in sparse.parameters())
        assert result.stats.grad_norm > MAX_NORM  # so the clipped steps clip
        check_against_dense(result, sparse, (s32, dense32), (s64, dense64), report)
        fired = torch.zeros(F, dtype=torch.bool)
        fired[result.indices.cpu()[result.values.cpu() > 0]] = True
        assert torch.equal(fired, (gap > 0).any(0))

    # Not vacuous: the lazy decay was exercised, and every parameter moved far more than the tolerance.
    assert dropped <= STEPS, f"{dropped} tokens dropped near boundaries"
    assert ((touched_steps > 0) & (touched_steps < STEPS)).any(), "no latent skipped a step"
    for name in PARAMS:
        moved = scaled_err(getattr(dense64, name).detach(), getattr(model0, name).detach())
        assert moved > 100 * (2 * report[name] + FLOOR), (name, moved)
    # Latents never fired nor in a window during the run are bit for bit where they started, in every
    # parameter: the sparse step never reads or writes them. The dense step adds a -0.0 Adam update there, but
    # normalize_decoder re-rounds every unit W_dec row (not idempotent in fp32), so its rows drift by ulps.
    never = (touched_steps == 0).nonzero().squeeze(1)
    assert set(DEAD.tolist()) <= set(never.tolist())
    for name, dim in LATENT_DIMS.items():
        if dim is not None:
            start = getattr(model0, name).detach().index_select(dim, never)
            assert torch.equal(getattr(sparse, name).detach().cpu().index_select(dim, never), start), name
            drift = (getattr(dense32, name).detach().index_select(dim, never) - start).abs().max().item()
            assert drift <= (STEPS * 2.0**-24 if name == "W_dec" else 0.0), (name, drift)  # |W_dec| <= 1
    print(
        f"\n{kind}: max error vs fp64 over {STEPS} steps ({dropped} tokens dropped near boundaries)",
        {k: f"{v:.1e}" for k, v in report.items()},
    )


# -- mixed precision: kept 16-bit operand copies, fp32 masters ---------------------------------------------------

COMPUTE_16 = [torch.float16] if INTERPRET else [torch.float16, torch.bfloat16]  # the interpreter cannot read bf16


def adam_like(model: JumpReLUSAE, lazy_state: dict) -> torch.optim.Adam:
    """torch Adam(0, BETA2) over `model` (any dtype or device) holding the converted state of a `LazyAdam`."""
    adam = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.0, BETA2), eps=ADAM_EPS, foreach=False)
    converted = adam_state_from_lazy(lazy_state)
    names = [name for name, _ in model.named_parameters()]
    adam.load_state_dict({"state": {i: converted[n] for i, n in enumerate(names)},
                          "param_groups": adam.state_dict()["param_groups"]})  # fmt: skip
    return adam


@pytest.mark.parametrize("compute_dtype", COMPUTE_16)
def test_mixed_precision_sparse_step_keeps_its_copies_and_matches_the_dense_step(compute_dtype):
    """compute_dtype steps on fp32 masters. After every step the kept W_enc / W_dec copies equal the masters
    rounded, with no full re-cast and no new [F, D]-shaped tensor after the first step. The last step, forked from
    the same state (parameters and converted optimizer state), matches Trainer.train_step's dense sequence on the
    reference backend at the same compute_dtype in fp32 and fp64, under the precision rule.

    Only one step is compared: along a trajectory, the fp32 and fp64 masters differ by ~2^-24 relative, which
    flips a 16-bit rounding with probability ~2^-13 per weight per step, an error 2^11 times larger (fp16; 2^16
    for bf16) that the fp32 rule rightly does not allow; the fork starts all runs from identical masters.
    """
    kind, steps = "target_l0", 4
    model0, data, scale = initial_sae(seed=5)
    sparse = copy.deepcopy(model0).to(DEVICE)
    sparse.compute_dtype = compute_dtype
    lazy = build_lazy_adam(sparse, BETA2, ADAM_EPS, validate=True)
    cache = sparse.operand_cache
    report: dict[str, float] = {}
    for step in range(steps):
        x = data.batch(step) * scale
        lr = lr_at(step, 3e-3, 1, steps, 0.2)
        coefficient = sparsity_coefficient_at(step + 1, COEFFICIENT[kind], 1)
        last = step == steps - 1
        if last:
            dense32 = copy.deepcopy(sparse).cpu()
            dense32.backend = "reference"
            dense64 = copy.deepcopy(dense32).double()
            adam32, adam64 = adam_like(dense32, lazy.state_dict()), adam_like(dense64, lazy.state_dict())
            x, _ = drop_near_boundaries(x, dense32, dense64)
            s32 = dense_step(dense32, adam32, x, lr, kind, coefficient, MAX_NORM)
            s64 = dense_step(dense64, adam64, x.double(), lr, kind, coefficient, MAX_NORM)
        guard = NoNewTensorOfShape([(F, D), (D, F), (x.shape[0], F)]) if step else None
        result = guarded_sparse_step(sparse, lazy, x, lr, kind, coefficient, MAX_NORM, guard)
        assert all(getattr(sparse, name).dtype == torch.float32 for name in PARAMS)
        W_enc, W_dec = cache.get(sparse)
        assert cache.full_casts == 2, "the kept copies were re-cast"
        assert torch.equal(W_enc, sparse.W_enc.detach().to(compute_dtype))
        assert torch.equal(W_dec, sparse.W_dec.detach().to(compute_dtype))
        if last:
            check_against_dense(result, sparse, (s32, dense32), (s64, dense64), report)
    print(f"\n{compute_dtype}: error vs fp64 on the forked step", {k: f"{v:.1e}" for k, v in report.items()})


# -- optimizer state: a run may switch between the dense and the sparse step on resume ---------------------------


def test_optimizer_state_converts_between_adam_and_lazy_adam():
    """Run 6 steps on one optimizer, convert its state, run 6 more on the other; compare with 12 steps on one.
    Tolerance 1e-5 of the largest parameter, as in tests/test_sparse_adam.py (there derived for 50 steps)."""
    Fs, Ds, steps = 13, 5, 12
    g = torch.Generator().manual_seed(7)
    model0 = JumpReLUSAE(Ds, Fs)
    with torch.no_grad():
        for p in model0.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    schedule = []
    for step in range(steps):
        touched = (torch.rand(Fs, generator=g) < 0.4).nonzero().squeeze(1)
        mask = torch.zeros(Fs)
        mask[touched] = 1.0
        grads = {}
        for name, p in model0.named_parameters():
            dim = LATENT_DIMS[name]
            grads[name] = torch.randn(p.shape, generator=g) * (
                1.0 if dim is None else mask.view([-1 if d == dim else 1 for d in range(p.dim())])
            )
        schedule.append((grads, touched, 1e-2 * (step + 1) / steps))

    def adam_for(model):
        return torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.0, BETA2), eps=ADAM_EPS, foreach=False)

    def adam_steps(model, opt, part):
        for grads, _, lr in part:
            for name, p in model.named_parameters():
                p.grad = grads[name].clone()
            opt.param_groups[0]["lr"] = lr
            opt.step()

    def lazy_steps(opt, part):
        for grads, touched, lr in part:
            opt.step(
                {
                    n: gr if LATENT_DIMS[n] is None else gr.index_select(LATENT_DIMS[n], touched)
                    for n, gr in grads.items()
                },
                touched,
                lr,
            )

    names = [name for name, _ in model0.named_parameters()]
    ref = copy.deepcopy(model0)
    adam_steps(ref, adam_for(ref), schedule)

    # Dense first, then sparse.
    a = copy.deepcopy(model0)
    adam_a = adam_for(a)
    adam_steps(a, adam_a, schedule[:6])
    lazy_a = build_lazy_adam(a, BETA2, ADAM_EPS)
    lazy_a.load_state_dict(lazy_state_from_adam(lazy_a, {n: adam_a.state[p] for n, p in a.named_parameters()}))
    lazy_steps(lazy_a, schedule[6:])

    # Sparse first, then dense (through the state dict alone, as from a checkpoint).
    b = copy.deepcopy(model0)
    lazy_b = build_lazy_adam(b, BETA2, ADAM_EPS)
    lazy_steps(lazy_b, schedule[:6])
    converted = adam_state_from_lazy(lazy_b.state_dict())
    adam_b = adam_for(b)
    adam_b.load_state_dict(
        {"state": {i: converted[n] for i, n in enumerate(names)}, "param_groups": adam_b.state_dict()["param_groups"]}
    )
    adam_steps(b, adam_b, schedule[6:])

    for name in names:
        want = getattr(ref, name).detach()
        moved = scaled_err(want, getattr(model0, name).detach())
        for run_name, model in (("dense->sparse", a), ("sparse->dense", b)):
            err = scaled_err(getattr(model, name).detach(), want)
            assert err <= 1e-5 < moved / 100, (run_name, name, err, moved)
