"""Hypothesis properties of the Triton SAE step's gradients, fp32 (interpreter on the CPU, see
tests/test_kernels_common.py). Shapes reach past the test tiles (32 x 64 x 16); an example costs up to
~1 s in the interpreter, so the example counts are small."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_kernels_common import (  # noqa: F401 (poisoned is a fixture)
    FLOOR,
    PARAMS,
    R,
    assert_matches,
    assert_step_matches_reference,
    kernel_forward,
    magnitudes,
    make_case,
    poisoned,
    rel_err,
    run,
)

# `poisoned` only swaps the allocator, so sharing it across a test's examples is what we want.
SHARED = [HealthCheck.function_scoped_fixture]
FEW = settings(max_examples=12, deadline=None, database=None, suppress_health_check=SHARED)


@st.composite
def cases(draw, crowd=True):
    B, D, F = draw(st.integers(1, 40)), draw(st.integers(1, 20)), draw(st.integers(1, 80))
    eps = draw(st.sampled_from([0.05, 0.25, 1.0]))
    kind = draw(st.sampled_from(["l0", "target_l0"]))
    return make_case(B, D, F, draw(st.integers(0, 2**31 - 1)), eps, crowd=crowd), eps, kind


def closed_form_threshold_grad(case, eps: float, kind: str, lam: float = 0.3, target: float = 5.0):
    """d loss / d theta from RECIPES.md section 1 in fp64: the JumpReLU path's dL/df at the window pairs
    (a decoder row dotted with dL/dx_hat) times -theta/eps, plus dL/dl0 times -1/eps."""
    c = {k: v.double() for k, v in case.items()}
    z = (c["x"] - c["b_dec"]) @ c["W_enc"] + c["b_enc"]
    theta, B = c["threshold"], z.shape[0]
    window = (((z - theta) / eps > -0.5) & ((z - theta) / eps < 0.5)).double()
    x_hat = torch.where(z > theta, z, 0.0) @ c["W_dec"] + c["b_dec"]
    g_f = (-2.0 * (c["x"] - x_hat) / B) @ c["W_dec"].T
    mean_l0 = (z > theta).double().sum(-1).mean()
    g_l0 = lam / B if kind == "l0" else lam * 2.0 * (mean_l0 / target - 1.0) / target / B
    return (g_f * -(theta / eps) * window).sum(0) + (g_l0 * -(1.0 / eps) * window).sum(0), window


def cpu(out, grads):
    """Outputs and gradients of `run` on the CPU, so they can be indexed with CPU permutations."""
    moved = [t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in out]
    return type(out)(*moved), {k: v.cpu() for k, v in grads.items()}


def max_window(case, eps: float) -> int:
    c = {k: v.double() for k, v in case.items()}
    u = ((c["x"] - c["b_dec"]) @ c["W_enc"] + c["b_enc"] - c["threshold"]) / eps
    return int(((u > -0.5) & (u < 0.5)).sum(1).max())


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=SHARED)
@given(cases())
def test_gradients_match_the_pseudo_derivatives(poisoned, arg):
    case, eps, kind = arg
    _, grads = assert_step_matches_reference(case, eps, kind)
    _, rgrads32 = run(R.sae_forward, case, eps, kind)
    closed, _ = closed_form_threshold_grad(case, eps, kind)
    assert_matches("d threshold (closed form)", grads["threshold"], rgrads32["threshold"], closed,
                   magnitudes(case, eps, kind)["threshold"])  # fmt: skip


def test_a_cancelling_b_dec_gradient_is_judged_by_its_terms(poisoned):
    """Hypothesis' counterexample to the rule without magnitudes (tests/test_kernels_common.py `assert_matches`):
    at d_in = 1, d b_dec = sum_b dL/dx_hat[b] - W_enc @ d b_enc is 0.058 while its terms sum to 380 in
    magnitude. Torch's fp32 error happened to be 8x smaller than the kernel's (both ~0.05 u of the terms): one
    sample of a rounding error, not a better summation order."""
    case = make_case(38, 1, 38, seed=40, eps=1.0)
    mag = magnitudes(case, 1.0, "l0")["b_dec"]
    _, g64 = run(R.sae_forward, case, 1.0, "l0", torch.float64)
    assert float(mag / g64["b_dec"].abs()) > 1000  # the case still cancels heavily
    assert_step_matches_reference(case, 1.0, "l0")


@FEW
@given(cases(crowd=False))
def test_threshold_gradient_is_zero_outside_the_window(poisoned, arg):
    case, eps, kind = arg
    _, grads = run(kernel_forward, case, eps, kind)
    _, window = closed_form_threshold_grad(case, eps, kind)
    outside = window.sum(0) == 0
    assert (grads["threshold"].cpu()[outside] == 0).all()


def test_no_threshold_gradient_when_the_window_is_empty(poisoned):
    """A bandwidth far below every |z - theta| leaves no pair in the window: theta gets no gradient."""
    for kind in ("l0", "target_l0"):
        _, grads = run(kernel_forward, make_case(33, 17, 67, seed=1, eps=1e-6, crowd=False), 1e-6, kind)
        assert (grads["threshold"] == 0).all()


@settings(max_examples=10, deadline=None, database=None, suppress_health_check=SHARED)
@given(cases(), st.randoms(use_true_random=False))
def test_permuting_latents_permutes_outputs_and_gradients(poisoned, arg, rnd):
    case, eps, kind = arg
    F = case["W_enc"].shape[1]
    perm = torch.tensor(rnd.sample(range(F), F))  # new latent i is old latent perm[i]
    permuted = dict(case, W_enc=case["W_enc"][:, perm], b_enc=case["b_enc"][perm], W_dec=case["W_dec"][perm],
                    threshold=case["threshold"][perm])  # fmt: skip
    (out, grads), (pout, pgrads) = (cpu(*run(kernel_forward, c, eps, kind)) for c in (case, permuted))
    inverse = torch.argsort(perm)
    assert torch.equal(pout.l0, out.l0) and torch.equal(pout.fire_counts, out.fire_counts[perm])
    used = out.values > 0
    assert torch.equal(torch.where(used, inverse[out.indices], 0), pout.indices)
    back = {"W_enc": lambda t: t[:, perm], "W_dec": lambda t: t[perm], "b_enc": lambda t: t[perm],
            "threshold": lambda t: t[perm], "b_dec": lambda t: t}  # fmt: skip
    for name, ref, got in [("x_hat", out.x_hat, pout.x_hat), ("values", out.values, pout.values)] + [
        (f"d {k}", back[k](grads[k]), pgrads[k]) for k in PARAMS
    ]:
        assert rel_err(got, ref.double()) <= FLOOR, name


@FEW
@given(cases(), st.data())
def test_overflowing_the_capacity_gives_the_same_result(poisoned, arg, data):
    case, eps, kind = arg
    out, grads = run(kernel_forward, case, eps, kind)
    max_l0 = int(out.l0.max())
    cap = data.draw(st.integers(1, max(max_l0 - 1, 1)), label="capacity")
    wcap = data.draw(st.integers(1, 3), label="window capacity")
    small, sgrads = run(kernel_forward, case, eps, kind, capacity=cap, window_capacity=wcap)
    assert out.reruns == 0
    overflowed = max_l0 > cap or wcap < max_window(case, eps)
    assert small.reruns == int(overflowed) and small.capacity == max(cap, max_l0)
    for a, b in zip(out[:5], small[:5]):
        assert torch.equal(a, b)  # bit for bit: everything after the encode is deterministic
    for name in PARAMS:
        assert torch.equal(grads[name], sgrads[name]), name
