"""`sae.sparse_adam.LazyAdam` against `torch.optim.Adam(betas=(0, beta2))` on dense gradients that are zero
outside the touched latents.

Tolerances. LazyAdam runs torch's operations in the same order and dtype; the only difference is that a
latent untouched for k steps has its second moment multiplied once by beta2**(k+1) (rounded to the dtype)
instead of k+1 times by beta2. That perturbs v by at most about (k+2) units of roundoff u, hence the update
by about (k+2)u/2 relative, and each perturbed update can flip the rounding of `param + update` by one ulp of
the parameter. Over S steps the parameter error is therefore below about S * (u * |p| + (S+2)u/2 * |update|)
~ S * u * max|p|: with S = 50, 50 * 6e-8 = 3e-6 in fp32 and 50 * 1.1e-16 = 6e-15 in fp64. We assert parameter
errors normalised by the reference's largest magnitude at 1e-5 (fp32, 3x its bound) and 1e-12 (fp64, a
wide margin over its bound), and check that the parameters moved by far more than that (not vacuous).
The finalised second moments carry only relative error, at most about (S+1)u = 3e-6 (fp32) and 6e-15 (fp64),
so they are compared elementwise against the same tolerances. Measured on this suite's 50-step run:
parameters 3e-8 (fp32) and 7e-17 (fp64), second moments 1e-6 and 1.3e-15. Dropping the lazy decay, an
off-by-one in it, or moving eps before the bias correction each gives parameter errors of 4e-5 to 5e-3.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from sae.sparse_adam import LazyAdam

BETA2, EPS = 0.999, 1e-8
LATENT_DIMS = {"W_enc": 1, "W_dec": 0, "b_enc": 0, "threshold": 0, "b_dec": None}
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# Per-parameter learning-rate multipliers, so a per-name lr is exercised against torch's param groups.
LR_SCALE = {"W_enc": 1.0, "W_dec": 0.5, "b_enc": 2.0, "threshold": 0.25, "b_dec": 1.5}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude."""
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def elementwise_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| / |expected|, with 0/0 = 0: for second moments, which span many orders of
    magnitude and carry only relative rounding error."""
    diff = (actual - expected).abs()
    return float(torch.where(diff == 0, 0.0, diff / expected.abs()).max()) if diff.numel() else 0.0


def make_params(F: int, D: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"W_enc": (D, F), "W_dec": (F, D), "b_enc": (F,), "threshold": (F,), "b_dec": (D,)}
    return {name: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for name, shape in shapes.items()}


def dense_grads(params: dict[str, torch.Tensor], touched: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random gradients, zero outside `touched` for latent parameters, with per-latent scales spanning
    1e-9..1e2 so that some sqrt(v_hat) sit near eps (which tests where eps is added)."""
    F = params["b_enc"].shape[0]
    latent_scale = 10.0 ** (torch.rand(F, generator=g, dtype=torch.float64) * 11 - 9)
    mask = torch.zeros(F, dtype=torch.float64)
    mask[touched] = 1.0
    grads = {}
    for name, p in params.items():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
        dim = LATENT_DIMS[name]
        if dim is not None:
            shape = [1] * p.dim()
            shape[dim] = -1
            noise = noise * (latent_scale * mask).view(shape)
        grads[name] = noise.to(p.dtype)
    return grads


def compact(grads: dict[str, torch.Tensor], touched: torch.Tensor) -> dict[str, torch.Tensor]:
    return {n: g if LATENT_DIMS[n] is None else g.index_select(LATENT_DIMS[n], touched) for n, g in grads.items()}


def mixed_schedule(F: int, steps: int, seed: int) -> torch.Tensor:
    """[steps, F] touch mask: latents 0-9 every step, 10-19 never, 20-29 rarely (p = 0.05), 60-66 only on the
    first and last step, the rest half the time; step 7 touches nothing. Ranges past F are simply absent."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(steps, F, generator=g) < 0.5
    mask[:, 0:10], mask[:, 10:20] = True, False
    mask[:, 20:30] = (torch.rand(steps, F, generator=g) < 0.05)[:, 20:30]
    mask[:, 60:67] = False
    mask[0, 60:67] = mask[-1, 60:67] = True
    mask[7] = False
    return mask


def lr_at(step: int, steps: int) -> float:
    """Warm-up over 10 steps, linear decay over the last 20%: a different lr on every step."""
    base = 1e-2 * min(1.0, (step + 1) / 10)
    return base * min(1.0, (steps - step) / (0.2 * steps))


def new_lazy(params: dict[str, torch.Tensor], F: int) -> LazyAdam:
    opt = LazyAdam(F, beta2=BETA2, eps=EPS)
    for name, p in params.items():
        opt.add(name, p, LATENT_DIMS[name])
    return opt


def new_torch(params: dict[str, torch.Tensor]) -> torch.optim.Adam:
    # foreach=False pins the single-tensor path whose formula LazyAdam mirrors (CPU picks it anyway).
    groups = [{"params": [p], "name": name} for name, p in params.items()]
    return torch.optim.Adam(groups, lr=1.0, betas=(0.0, BETA2), eps=EPS, foreach=False)


def run_both(params0, mask: torch.Tensor, seed: int, per_param_lr: bool, finalize_at: int | None = None):
    """Step LazyAdam (compact gradients) and torch's Adam (dense ones) side by side; return both."""
    F, steps = mask.shape[1], mask.shape[0]
    lazy_p = {n: p.clone() for n, p in params0.items()}
    torch_p = {n: p.clone().requires_grad_() for n, p in params0.items()}
    lazy, ref = new_lazy(lazy_p, F), new_torch(torch_p)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        touched = mask[step].nonzero().squeeze(1)
        touched = touched[torch.randperm(touched.shape[0], generator=g)]  # any order is allowed
        grads = dense_grads(lazy_p, touched, g)
        lr = lr_at(step, steps)
        lrs = {n: lr * LR_SCALE[n] for n in params0} if per_param_lr else dict.fromkeys(params0, lr)
        lazy.step(compact(grads, touched), touched, lrs if per_param_lr else lr)
        for group in ref.param_groups:
            group["lr"] = lrs[group["name"]]
            group["params"][0].grad = grads[group["name"]]
        ref.step()
        if step == finalize_at:
            lazy.finalize()
    lazy.finalize()
    return lazy_p, lazy, torch_p, ref


def assert_matches_torch(params0, lazy_p, lazy, torch_p, ref, tol: float) -> dict[str, float]:
    errors = {}
    for name, p in torch_p.items():
        errors[name] = rel_err(lazy_p[name], p.detach())
        v_ref = ref.state[p]["exp_avg_sq"]
        errors[f"{name}.v"] = elementwise_rel_err(lazy.state_dict()[f"{name}.exp_avg_sq"], v_ref)
        assert float(ref.state[p]["step"]) == lazy.step_count
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"errors above {tol}: {bad}"
    return errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_param_lr", [False, True])
def test_matches_torch_adam_over_50_steps(dtype, per_param_lr):
    F, D, steps = 67, 13, 50
    params0 = make_params(F, D, dtype, seed=1)
    mask = mixed_schedule(F, steps, seed=2)
    lazy_p, lazy, torch_p, ref = run_both(params0, mask, seed=3, per_param_lr=per_param_lr, finalize_at=30)
    assert_matches_torch(params0, lazy_p, lazy, torch_p, ref, TOL[dtype])
    # Not vacuous: every parameter moved by far more than the tolerance (the least, threshold, by ~1e-2).
    for name, p in torch_p.items():
        assert rel_err(params0[name], p.detach()) > 100 * TOL[dtype], name
    # Never-touched latents 10-19 are bit-for-bit unchanged, in both optimisers.
    for name, dim in LATENT_DIMS.items():
        if dim is not None:
            never = torch.arange(10, 20)
            assert torch.equal(lazy_p[name].index_select(dim, never), params0[name].index_select(dim, never))
            assert torch.equal(torch_p[name].detach().index_select(dim, never), params0[name].index_select(dim, never))


def test_every_latent_touched_every_step_is_bit_identical_to_torch():
    """With no pending decays LazyAdam performs torch's exact operations, so the results are equal bitwise."""
    F, D, steps = 33, 7, 12
    params0 = make_params(F, D, torch.float32, seed=4)
    mask = torch.ones(steps, F, dtype=torch.bool)
    lazy_p, lazy, torch_p, ref = run_both(params0, mask, seed=5, per_param_lr=True)
    for name, p in torch_p.items():
        assert torch.equal(lazy_p[name], p.detach()), name
        assert torch.equal(lazy.state_dict()[f"{name}.exp_avg_sq"], ref.state[p]["exp_avg_sq"]), name


def test_untouched_latents_are_neither_read_nor_written():
    """NaN-poison the parameters and second moments of latents that are never touched: the run must equal an
    unpoisoned one everywhere else, the poison must stay where it was, and untouched latents of each step
    must be bitwise unchanged by that step."""
    F, D, steps = 41, 5, 20
    params0 = make_params(F, D, torch.float32, seed=6)
    mask = mixed_schedule(F, steps, seed=7)
    never = torch.arange(10, 20)
    clean_p, poisoned_p = ({n: p.clone() for n, p in params0.items()} for _ in range(2))
    clean, poisoned = new_lazy(clean_p, F), new_lazy(poisoned_p, F)
    state = poisoned.state_dict()
    for name, dim in LATENT_DIMS.items():
        if dim is not None:
            poisoned_p[name].index_fill_(dim, never, float("nan"))
            state[f"{name}.exp_avg_sq"].index_fill_(dim, never, float("nan"))
    poisoned.load_state_dict(state)
    g = torch.Generator().manual_seed(8)
    for step in range(steps):
        touched = mask[step].nonzero().squeeze(1)
        grads = compact(dense_grads(clean_p, touched, g), touched)
        before = {n: p.clone() for n, p in clean_p.items()}
        clean.step(grads, touched, lr_at(step, steps))
        poisoned.step(grads, touched, lr_at(step, steps))
        untouched = (~mask[step]).nonzero().squeeze(1)
        for name, dim in LATENT_DIMS.items():
            if dim is not None:
                after = clean_p[name].index_select(dim, untouched)
                assert torch.equal(after, before[name].index_select(dim, untouched)), (name, step)
    rest = (~torch.isin(torch.arange(F), never)).nonzero().squeeze(1)
    clean_state, poisoned_state = clean.state_dict(), poisoned.state_dict()
    for name, dim in LATENT_DIMS.items():
        if dim is None:
            assert torch.equal(poisoned_p[name], clean_p[name])
            continue
        assert poisoned_p[name].index_select(dim, never).isnan().all()
        assert poisoned_state[f"{name}.exp_avg_sq"].index_select(dim, never).isnan().all()
        assert torch.equal(poisoned_p[name].index_select(dim, rest), clean_p[name].index_select(dim, rest))
        assert torch.equal(
            poisoned_state[f"{name}.exp_avg_sq"].index_select(dim, rest),
            clean_state[f"{name}.exp_avg_sq"].index_select(dim, rest),
        )


def test_state_dict_round_trip_mid_run_continues_identically():
    F, D, steps, cut = 29, 6, 30, 13
    params0 = make_params(F, D, torch.float32, seed=9)
    mask = mixed_schedule(F, steps, seed=10)
    g = torch.Generator().manual_seed(11)
    schedule = []
    for step in range(steps):
        touched = mask[step].nonzero().squeeze(1)
        schedule.append((compact(dense_grads(params0, touched, g), touched), touched, lr_at(step, steps)))

    a_p = {n: p.clone() for n, p in params0.items()}
    a = new_lazy(a_p, F)
    for grads, touched, lr in schedule[:cut]:
        a.step(grads, touched, lr)
    # Through safetensors bytes, as a checkpoint would go; pending decays travel as latent_last_step.
    saved = load(save(a.state_dict()))
    assert int(saved["latent_last_step"].max()) == cut and int(saved["latent_last_step"].min()) < cut
    b_p = {n: p.clone() for n, p in a_p.items()}
    b = new_lazy(b_p, F)
    b.load_state_dict(saved)
    for grads, touched, lr in schedule[cut:]:
        a.step(grads, touched, lr)
        b.step(grads, touched, lr)
    for name in params0:
        assert torch.equal(a_p[name], b_p[name]), name
    a_state, b_state = a.state_dict(), b.state_dict()
    assert a_state.keys() == b_state.keys()
    for key in a_state:
        assert torch.equal(a_state[key], b_state[key]), key


def test_load_state_dict_refuses_mismatches():
    params = make_params(11, 3, torch.float32, seed=12)
    opt = new_lazy(params, 11)
    state = opt.state_dict()
    with pytest.raises(ValueError, match="missing"):
        opt.load_state_dict({k: v for k, v in state.items() if k != "W_dec.exp_avg_sq"})
    other = LazyAdam(11, beta2=0.99, eps=EPS)
    for name, p in params.items():
        other.add(name, p.clone(), LATENT_DIMS[name])
    with pytest.raises(ValueError, match="beta2"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict({**state, "b_enc.exp_avg_sq": torch.zeros(12)})
    with pytest.raises(ValueError, match="latent_last_step"):
        opt.load_state_dict({**state, "latent_last_step": torch.full((11,), 5, dtype=torch.int64)})


@st.composite
def touch_patterns(draw):
    F, D, steps = draw(st.integers(1, 24)), draw(st.integers(1, 4)), draw(st.integers(1, 15))
    p = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    rows = draw(st.lists(st.lists(st.floats(0, 1), min_size=F, max_size=F), min_size=steps, max_size=steps))
    mask = torch.tensor(rows, dtype=torch.float64).reshape(steps, F) < p
    return mask, D, draw(st.integers(0, 2**31 - 1)), draw(st.booleans())


@settings(max_examples=25, deadline=None, database=None)
@given(touch_patterns())
def test_property_random_touch_patterns_match_torch(case):
    mask, D, seed, per_param_lr = case
    F = mask.shape[1]
    params0 = make_params(F, D, torch.float64, seed=seed)
    lazy_p, lazy, torch_p, ref = run_both(params0, mask, seed=seed + 1, per_param_lr=per_param_lr)
    assert_matches_torch(params0, lazy_p, lazy, torch_p, ref, TOL[torch.float64])
    never = (~mask.any(0)).nonzero().squeeze(1)
    for name, dim in LATENT_DIMS.items():
        if dim is not None:
            assert torch.equal(lazy_p[name].index_select(dim, never), params0[name].index_select(dim, never))


@pytest.fixture
def small():
    F, D = 10, 4
    params = make_params(F, D, torch.float32, seed=13)
    opt = new_lazy(params, F)
    touched = torch.tensor([3, 0, 7])
    grads = compact(dense_grads(params, touched, torch.Generator().manual_seed(14)), touched)
    return opt, params, grads, touched


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda g, t: ({**g, "W_enc": torch.zeros(4, 10)}, t), r"W_enc has shape \(4, 10\).*\(4, 3\)"),
        (lambda g, t: ({**g, "W_dec": torch.zeros(4, 3)}, t), r"W_dec has shape \(4, 3\).*\(3, 4\)"),
        (lambda g, t: ({**g, "b_dec": torch.zeros(3)}, t), r"b_dec has shape \(3,\); the full gradient"),
        (lambda g, t: ({**g, "b_enc": torch.zeros(3, dtype=torch.float64)}, t), "b_enc is torch.float64"),
        (lambda g, t: ({k: v for k, v in g.items() if k != "threshold"}, t), "one gradient per registered"),
        (lambda g, t: (g, torch.tensor([3, 0, 10])), r"in \[0, 10\); got min 0, max 10"),
        (lambda g, t: (g, torch.tensor([3, -1, 7])), r"in \[0, 10\); got min -1"),
        (lambda g, t: (g, torch.tensor([3, 0, 3])), "distinct"),
        (lambda g, t: (g, t.to(torch.int32)), "1-D int64"),
    ],
    ids=[
        "W_enc-dense",
        "W_dec-transposed",
        "b_dec-compact",
        "dtype",
        "missing",
        "id-too-large",
        "id-negative",
        "duplicate",
        "int32-ids",
    ],
)
def test_clear_errors_leave_state_unchanged(small, edit, message):
    opt, params, grads, touched = small
    before = {n: p.clone() for n, p in params.items()}
    bad_grads, bad_touched = edit(grads, touched)
    with pytest.raises(ValueError, match=message):
        opt.step(bad_grads, bad_touched, 1e-3)
    assert opt.step_count == 0
    assert all(torch.equal(params[n], before[n]) for n in params)
    opt.step(grads, touched, 1e-3)
    assert opt.step_count == 1


def test_registration_errors():
    opt = LazyAdam(8)
    with pytest.raises(ValueError, match="num_latents=8"):
        opt.add("W_enc", torch.zeros(4, 9), latent_dim=1)
    opt.add("b_enc", torch.zeros(8), latent_dim=0)
    with pytest.raises(ValueError, match="already registered"):
        opt.add("b_enc", torch.zeros(8), latent_dim=0)
    opt.step({"b_enc": torch.zeros(0)}, torch.zeros(0, dtype=torch.int64), 1e-3)
    with pytest.raises(RuntimeError, match="before the first step"):
        opt.add("b_dec", torch.zeros(3), latent_dim=None)
