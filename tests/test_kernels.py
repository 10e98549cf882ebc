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
    assert_matches,
    assert_step_matches_reference,
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
    out, _ = assert_step_matches_reference(case, EPS, kind, grad_x=grad_x)

    acts = ((case["x"] - case["b_dec"]) @ case["W_enc"] + case["b_enc"]) > case["threshold"]
    assert torch.equal(out.fire_counts.cpu().long(), acts.sum(0))
    assert out.reruns == 0 and out.capacity >= int(out.l0.max())
    u = (((case["x"] - case["b_dec"]) @ case["W_enc"] + case["b_enc"]) - case["threshold"]) / EPS
    assert out.window_pairs == int(((u > -0.5) & (u < 0.5)).sum()) > 0


def test_16_bit_tensors_give_the_compute_dtype_results(poisoned):
    """fp16 x, W_enc, W_dec tensors (the interpreter cannot read bf16) beside fp32 b_enc, b_dec, threshold, against
    the fp32 reference with compute_dtype=float16 on the same values (the same rounded operands, x - b_dec
    included). Only the fp16 outputs' roundings remain (x_hat, then dL/dx_hat, the stored W gradients, each at
    most 2^-11 relative): tolerance 2^-9 relative to the reference's largest element. l0 is an fp32 count.
    """
    half = {"x": torch.float16, "W_enc": torch.float16, "W_dec": torch.float16}
    case = make_case(33, 17, 67, seed=5, operands=torch.float16, compute_dtype=torch.float16)
    t = {k: v.to(DEVICE, half.get(k, torch.float32), copy=True).requires_grad_(k != "x") for k, v in case.items()}
    out = kernel_forward(t["x"], *(t[k] for k in PARAMS), EPS)
    loss_of("l0", t["x"].float(), out.x_hat.float(), out.l0).backward()
    ref, rgrads = run(R.sae_forward, case, EPS, "l0", compute_dtype=torch.float16)
    assert out.x_hat.dtype == out.values.dtype == torch.float16 and out.l0.dtype == torch.float32
    assert rel_err(out.x_hat, ref.x_hat.double()) <= 2.0**-9 and torch.equal(out.l0.cpu(), ref.l0)
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
        (lambda t: {"threshold": t["threshold"].index_fill(0, torch.tensor([2]), 0.0)}, "2 = 0.0"),
        (lambda t: {"threshold": -t["threshold"]}, r"6 of 6 entries are <= 0 or NaN, e.g. latent 0"),
        (lambda t: {"threshold": t["threshold"].index_fill(0, torch.tensor([5]), float("nan"))}, "5 = nan"),
    ],
)
def test_bad_inputs_name_the_problem(change, message):
    t = dict(zip(("x", *PARAMS), _inputs()))
    with pytest.raises(ValueError, match=message):
        sae_step.sae_forward(*_inputs(**change(t)), EPS)


@pytest.mark.parametrize("bandwidth", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_bandwidth_is_refused(bandwidth):
    for forward in (sae_step.sae_forward, R.sae_forward):
        with pytest.raises(ValueError, match="bandwidth must be a finite number > 0"):
            forward(*_inputs(), bandwidth)


def test_the_encode_checks_thresholds_in_its_own_read_back(poisoned):
    """On a GPU the host-side check cannot see theta's values; the encode reads them with its slot counts."""
    from kernels.jumprelu_encode import jumprelu_encode

    x, W_enc, b_enc, _, b_dec, theta = _inputs()
    with pytest.raises(ValueError, match="threshold must be > 0"):
        jumprelu_encode(x, W_enc, b_enc, b_dec, theta.index_fill(0, torch.tensor([1]), -0.5), EPS)


def test_l0_is_an_exact_fp32_count_past_16_bit_precision(poisoned):
    """2049 latents fire in one row: not representable in fp16 (nor 601 in bf16); l0 is fp32 and exact in the
    kernels (fp16 operands) and in the reference (fp16 and bf16 operands)."""
    F = 2049
    t = {k: v.to(DEVICE) for k, v in make_case(2, 16, F, seed=3, crowd=False).items()}
    t["b_enc"] = t["b_enc"] + 10.0  # every latent fires in every row
    args = [t[k] for k in ("x", *PARAMS)]
    out = kernel_forward(*args, EPS, compute_dtype=torch.float16)
    assert out.l0.dtype == torch.float32 and out.l0.tolist() == [F, F]
    for dtype in (torch.float16, torch.bfloat16):
        ref = R.sae_forward(*(a.cpu().to(dtype) for a in args), EPS)
        assert ref.l0.dtype == torch.float32 and ref.l0.tolist() == [F, F], dtype


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
