"""The Triton SAE step against the PyTorch reference: outputs and every gradient, ragged shapes, fp32.

Runs in Triton's interpreter on the CPU when there is no GPU (see tests/test_kernels_common.py). Tiles are
BLOCKS = (32 rows, 64 latents, 16 d_in) for the encode and 16 x 16 elsewhere; the shapes below put B, D,
F, the per-row L0 and the per-latent pair counts on both sides of them.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_kernels_common import (  # noqa: F401 (poisoned is a fixture)
    DEVICE,
    PARAMS,
    R,
    assert_active_set,
    assert_matches,
    decode_sparse,
    kernel_forward,
    loss_of,
    make_case,
    poisoned,
    rel_err,
    run,
    sae_step,
)

EPS = 0.25


@pytest.mark.parametrize(
    "B, D, F, kind, grad_x",
    [
        (1, 17, 63, "l0", False),
        (7, 15, 67, "target_l0", True),
        (33, 17, 67, "l0", True),
        (33, 15, 63, "target_l0", False),
        (33, 17, 63, "mse", False),
        (7, 17, 67, "l0_only", False),
    ],
)
def test_step_matches_reference(B, D, F, kind, grad_x, poisoned):
    case = make_case(B, D, F, seed=B * 1000 + D * 10 + F)
    out, grads = run(kernel_forward, case, EPS, kind, grad_x=grad_x)
    ref32, rgrads32 = run(R.sae_forward, case, EPS, kind, grad_x=grad_x)
    ref64, rgrads64 = run(R.sae_forward, case, EPS, kind, torch.float64, grad_x=grad_x)

    assert_matches("x_hat", out.x_hat, ref32.x_hat, ref64.x_hat)
    assert_active_set(out, ref32, ref64, F)
    for name in rgrads64:
        assert_matches(f"d {name}", grads[name], rgrads32[name], rgrads64[name])

    acts = ((case["x"] - case["b_dec"]) @ case["W_enc"] + case["b_enc"]) > case["threshold"]
    assert torch.equal(out.fire_counts.cpu().long(), acts.sum(0))
    assert out.reruns == 0 and out.capacity >= int(out.l0.max())
    u = (((case["x"] - case["b_dec"]) @ case["W_enc"] + case["b_enc"]) - case["threshold"]) / EPS
    assert out.window_pairs == int(((u > -0.5) & (u < 0.5)).sum()) > 0


def test_16_bit_operands_with_fp32_master_parameters(poisoned):
    """fp16 x, W_enc, W_dec (the interpreter cannot read bf16) beside fp32 b_enc, b_dec, threshold.

    Inputs are fp16-exact, and every kernel upcasts right after loading, so against the fp32 reference
    on the same values only three fp16 roundings remain (x_hat, dL/dx_hat, the stored W gradients):
    tolerance 2^-9 relative to the reference's largest element.
    """
    half = {"x": torch.float16, "W_enc": torch.float16, "W_dec": torch.float16}
    case = make_case(33, 17, 67, seed=5, operands=torch.float16)
    t = {k: v.to(DEVICE, half.get(k, torch.float32), copy=True).requires_grad_(k != "x") for k, v in case.items()}
    out = kernel_forward(t["x"], *(t[k] for k in PARAMS), EPS)
    loss_of("l0", t["x"].float(), out.x_hat.float(), out.l0.float()).backward()
    ref, rgrads = run(R.sae_forward, case, EPS, "l0")
    assert out.x_hat.dtype == out.values.dtype == out.l0.dtype == torch.float16
    assert rel_err(out.x_hat, ref.x_hat.double()) <= 2.0**-9 and torch.equal(out.l0.float().cpu(), ref.l0.cpu())
    for name in PARAMS:
        assert t[name].grad.dtype == t[name].dtype, name
        assert rel_err(t[name].grad, rgrads[name].double()) <= 2.0**-9, name


def test_public_function_is_the_reference_signature(poisoned):
    import inspect

    assert inspect.signature(sae_step.sae_forward) == inspect.signature(R.sae_forward)
    case = make_case(5, 9, 40, seed=1)
    t = [case[k].to(DEVICE) for k in ("x", *PARAMS)]
    out, ref = sae_step.sae_forward(*t, EPS), R.sae_forward(*t, EPS)
    assert type(out) is R.Forward
    torch.testing.assert_close(out.x_hat, ref.x_hat, rtol=0, atol=2e-6)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.l0, ref.l0)


@pytest.mark.parametrize("B, K, F, D", [(1, 1, 5, 3), (9, 17, 40, 17), (17, 15, 33, 15)])
def test_sparse_decode_matches_reference(B, K, F, D, poisoned):
    g = torch.Generator().manual_seed(K)
    indices = torch.randint(0, F, (B, K), generator=g)  # repeats within a row allowed
    ins = [indices, torch.randn(B, K, generator=g), torch.randn(F, D, generator=g), torch.randn(D, generator=g)]
    up = torch.randn(B, D, generator=g)
    results = []
    runs = [(decode_sparse, torch.float32), (R.decode_sparse, torch.float32), (R.decode_sparse, torch.float64)]
    for fn, dtype in runs:
        t = [ins[0].to(DEVICE)] + [v.to(DEVICE, dtype, copy=True).requires_grad_() for v in ins[1:]]
        out = fn(*t)
        out.backward(up.to(DEVICE, dtype))
        results.append([out] + [v.grad for v in t[1:]])
    for name, got, r32, r64 in zip(("x_hat", "d values", "d W_dec", "d b_dec"), *results):
        assert_matches(name, got, r32, r64)


def _inputs(**change):
    t = {k: v.to(DEVICE) for k, v in make_case(3, 4, 6, seed=0).items()}
    t.update(change)
    return [t[k] for k in ("x", *PARAMS)]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: {"W_dec": t["W_dec"][:, :-1]}, "W_dec has shape"),
        (lambda t: {"threshold": t["threshold"][:-1]}, "threshold has shape"),
        (lambda t: {"x": t["x"][None]}, "x must be"),
        (lambda t: {"b_enc": t["b_enc"].long()}, "floating-point"),
        (lambda t: {"W_enc": t["W_enc"].t().contiguous().t()}, "W_enc must be contiguous"),
        (lambda t: {"x": t["x"].t().contiguous().t()}, "x must be contiguous"),
        (lambda t: {"threshold": t["threshold"].to("meta")}, "threshold is on meta"),
        (lambda t: {k: v.to("meta") for k, v in t.items()}, "need CUDA tensors"),
    ],
)
def test_bad_inputs_name_the_problem(change, message):
    t = dict(zip(("x", *PARAMS), _inputs()))
    with pytest.raises(ValueError, match=message):
        sae_step.sae_forward(*_inputs(**change(t)), EPS)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's bf16 limitation")
def test_bf16_is_refused_by_the_interpreter():
    t = _inputs()
    t[0] = t[0].bfloat16()
    with pytest.raises(ValueError, match="x is bfloat16"):
        sae_step.sae_forward(*t, EPS)


def test_flops_and_bytes_are_dominated_by_the_encoder_product():
    flops, nbytes = sae_step.flops_and_bytes(B=4096, D=2304, F=2**20, K=64, W=64)
    assert 2 * 4096 * 2304 * 2**20 <= flops < 1.01 * 2 * 4096 * 2304 * 2**20
    assert 2 * 2304 * 2**20 * 2 < nbytes < 80e9  # reads W_enc once, writes the dense weight gradients
