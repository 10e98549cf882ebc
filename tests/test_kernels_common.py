"""Shared set-up of the kernel tests (no tests here): interpreter mode, cases, the precision rule, poisoning.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. TRITON_INTERPRET is read when a
module defining a kernel is imported, so this module sets it before importing `kernels.*` and checks that
it took effect (it cannot if something imported the kernel modules earlier in the same process). The
kernel test files therefore import the kernels only through this module.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import Tensor  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from kernels import jumprelu_encode, launch, sae_step  # noqa: E402
from kernels import reference as R  # noqa: E402, F401 (re-exported to the tests)
from kernels.sae_pipeline import Blocks  # noqa: E402
from kernels.sparse_decode import decode_sparse  # noqa: E402, F401 (re-exported to the tests)

INTERPRET = launch.interpreting()
DEVICE = "cpu" if INTERPRET else "cuda"
if INTERPRET and not isinstance(jumprelu_encode._jumprelu_encode_kernel, InterpretedFunction):
    raise RuntimeError("kernels/ was imported before TRITON_INTERPRET=1 was set: run pytest with TRITON_INTERPRET=1")
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no GPU and TRITON_INTERPRET is off", allow_module_level=True)

# Small tiles so that test shapes of a few dozen fall on both sides of every block size.
BLOCKS = Blocks(encode=(32, 64, 16), rows=(16, 16), pairs=(16, 16))
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")

# Precision rule: see `assert_matches`. FLOOR = 2^-18, 64 fp32 unit roundoffs.
FLOOR = 2.0**-18
U32 = 2.0**-24  # fp32 unit roundoff


def make_case(
    B: int,
    D: int,
    F: int,
    seed: int,
    eps: float = 0.25,
    margin: float = 1e-4,
    crowd: bool = True,
    operands: torch.dtype = torch.float32,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """fp32 inputs (CPU) where no pre-activation lies within `margin` of a decision boundary (z = theta,
    z = theta +- eps/2), so the kernels' and the references' masks agree despite rounding.

    With `crowd` (and F >= 5), latents 0-2 fire in nearly every row and latents 3-4 sit inside the window in every row
    (3 active, 4 not), so the latent-major kernels see more pairs per latent than one block holds.
    operands: x, W_enc, W_dec are rounded to it (still returned as fp32), for runs that pass 16-bit tensors.
    compute_dtype: the margins are those of the pre-activations computed with this `compute_dtype` (rounded x,
        x - b_dec and W_enc, `kernels.reference`); x, W_enc, W_dec keep their fp32 values so that the rounding is
        exercised, and b_dec is made compute_dtype-exact so that x - b_dec is exact in fp32 (the kernels round
        that fp32 difference, the fp64 reference the exact one: the same value then).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    W_enc = torch.randn(D, F, generator=g) / D**0.5
    b_enc = torch.randn(F, generator=g) * 0.1
    W_dec = torch.randn(F, D, generator=g) / D**0.5
    b_dec = torch.randn(D, generator=g) * 0.1
    theta = torch.rand(F, generator=g) + 0.3
    if crowd and F >= 5:
        b_enc[:3] += 4.0  # fire in nearly every row
        W_enc[:, 3:5] *= 0.01 * eps  # z nearly constant, inside the window in every row: active, inactive
        b_enc[3:5] = theta[3:5] + torch.tensor([eps / 8, -eps / 8])
    x, W_enc, W_dec = (t.to(operands).float() for t in (x, W_enc, W_dec))
    if compute_dtype is None:
        z = (x.double() - b_dec.double()) @ W_enc.double() + b_enc.double()
    else:
        b_dec = b_dec.to(compute_dtype).float()

        def r(t: Tensor) -> Tensor:
            return t.to(compute_dtype).double()

        z = r(r(x) - b_dec.double()) @ r(W_enc) + b_enc.double()
    for _ in range(100):
        d = z - theta.double()
        bad = ((d.abs() < margin) | ((d.abs() - eps / 2).abs() < margin)).any(0)
        if not bad.any():
            return {"x": x, "W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": theta}
        moved = theta + (torch.rand(F, generator=g) - 0.5) * max(eps, 100 * margin) / 10
        theta = torch.where(bad & (moved > 0.05), moved, theta)  # JumpReLU needs theta > 0
    raise AssertionError("could not move the thresholds away from every pre-activation")


def kernel_forward(*args, **kw):
    """`sae_forward_sparse` with the small test tiles."""
    return sae_step.sae_forward_sparse(*args, blocks=BLOCKS, **kw)


def loss_of(kind: str, x: Tensor, x_hat: Tensor, l0: Tensor, lam: float = 0.3, target: float = 5.0) -> Tensor:
    """MSE plus one sparsity term (RECIPES.md section 1); "mse" and "l0_only" isolate each path."""
    rec = (x - x_hat).pow(2).sum(-1).mean()
    if kind == "mse":
        return rec
    if kind == "l0_only":
        return lam * l0.mean()
    sparsity = lam * l0.mean() if kind == "l0" else lam * (l0.mean() / target - 1.0) ** 2
    return rec + sparsity


def run(forward, case: dict[str, Tensor], eps: float, kind: str, dtype=torch.float32, grad_x=False, **kw):
    """Forward and backward of `forward` on a copy of `case`; returns (outputs, {name: gradient})."""
    t = {k: v.to(DEVICE, dtype, copy=True).requires_grad_(k != "x" or grad_x) for k, v in case.items()}
    out = forward(t["x"], *(t[k] for k in PARAMS), eps, **kw)
    loss_of(kind, t["x"], out.x_hat, out.l0).backward()
    names = PARAMS + (("x",) if grad_x else ())
    # A parameter the loss does not reach (W_dec under "l0_only") has no gradient in the reference: zeros.
    return out, {k: torch.zeros_like(t[k]) if t[k].grad is None else t[k].grad for k in names}


def magnitudes(
    case: dict[str, Tensor],
    eps: float,
    kind: str,
    lam: float = 0.3,
    target: float = 5.0,
    row_weights: Tensor | None = None,
) -> dict:
    """fp64 magnitude M (sum of |terms|) of every output and gradient of `run(..., kind)` on `case`, for
    `assert_matches`: the same computation with every input and intermediate replaced by its absolute value and
    every subtraction by an addition (the active set and the window taken from the exact pre-activations).

        z~      = (|x| + |b_dec|) @ |W_enc| + |b_enc|          f~ = z~ * H          x_hat~ = f~ @ |W_dec| + |b_dec|
        g~      = 2 (x_hat~ + |x|) w   (0 for "l0_only")       df~ = g~ @ |W_dec|^T       dz~ = df~ * H
        W_dec~  = f~^T @ g~     W_enc~ = (|x| + |b_dec|)^T @ dz~     b_enc~ = sum_b dz~
        b_dec~  = sum_b g~ + sum_b dz~ @ |W_enc|^T                   x~ = g~ + dz~ @ |W_enc|^T
        theta~  = (theta / eps) sum_b df~ * K + (1 / eps) dL/dl0~ sum_b K
    with dL/dl0~ = lam / B ("l0"), 2 lam (m / target + 1) / (target B) ("target_l0", m = mean L0), and w the
    rows' weights dL/de_b of the reconstruction term on the per-token errors e_b (`row_weights` [B], e.g. TERM's
    softmax; default 1 / B, the plain mean).
    "values" is the dense [B, F] f~, as `assert_active_set` compares the active values densely.
    """
    c = {k: v.double() for k, v in case.items()}
    a = {k: v.abs() for k, v in c.items()}
    B = c["x"].shape[0]
    z = (c["x"] - c["b_dec"]) @ c["W_enc"] + c["b_enc"]
    H = (z > c["threshold"]).double()
    u = (z - c["threshold"]) / eps
    window = ((u > -0.5) & (u < 0.5)).double()
    xc = a["x"] + a["b_dec"]
    f = (xc @ a["W_enc"] + a["b_enc"]) * H
    x_hat = f @ a["W_dec"] + a["b_dec"]
    g = 2.0 * (x_hat + a["x"])
    g = g / B if row_weights is None else g * row_weights.double()[:, None]
    g = g if kind != "l0_only" else torch.zeros_like(x_hat)
    df = g @ a["W_dec"].T
    dz = df * H
    mean_l0 = float(H.sum(-1).mean())
    target_g = lam * 2.0 * (mean_l0 / target + 1.0) / target / B
    g_l0 = {"mse": 0.0, "l0": lam / B, "l0_only": lam / B, "target_l0": target_g}[kind]
    return {
        "x_hat": x_hat, "values": f, "W_enc": xc.T @ dz, "b_enc": dz.sum(0), "W_dec": f.T @ g,
        "b_dec": g.sum(0) + (dz @ a["W_enc"].T).sum(0), "x": g + dz @ a["W_enc"].T,
        "threshold": (c["threshold"] / eps) * (df * window).sum(0) + (g_l0 / eps) * window.sum(0),
    }  # fmt: skip


def rel_err(got: Tensor, ref64: Tensor) -> float:
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    return (got.cpu().double() - ref64.cpu()).abs().max().item() / (scale or 1.0) if ref64.numel() else 0.0


def assert_matches(name: str, got: Tensor, ref32: Tensor, ref64: Tensor, magnitude: Tensor | None = None) -> None:
    """The precision rule: `got`'s error against the fp64 reference `ref64` is at most twice the error of PyTorch
    computing the same thing in fp32 (`ref32`), plus a floor of 64 fp32 roundoffs (FLOOR = 64 u) of the terms
    summed, elementwise:

        |got - ref64|_e  <=  2 max_e' |ref32 - ref64|_e'  +  FLOOR * max(S, M_e),   S = max |ref64|,

    M_e = `magnitudes(...)[name]`_e (without it: S alone, the flash-attention rule as first written here).

    Why M and not S. Every output is a sum of products of the inputs, nested (z, x_hat, dL/dx_hat, dz, then the
    gradients). Evaluated in fp32 in ANY order, such a sum y has (Higham, Accuracy and Stability of Numerical
    Algorithms, 2nd ed., sections 3.1-3.5, to first order in u)

        |y_computed - y|  <=  gamma_N * M,     gamma_N = N u / (1 - N u),   u = 2^-24,

    where M is the same computation on the absolute values of every input and intermediate (each sum then adds
    |terms|; an error in an intermediate q is at most its own gamma times q~ and is carried forward by the same
    absolute coefficients that build M), and N is the number of roundings on the longest dependency chain:
    x - b_dec (1), z (D + 1), x_hat (F + 1), dL/dx_hat (2), dz (D), the batch and latent sums of the gradients
    (B, F), one last subtraction: N <= 2 (B + D + F) + 8: at most 288 for the interpreter's test shapes, 926 for
    tests/gpu. M >= |y|, with equality when nothing cancels. The kernel and torch differ only in summation order,
    so both errors are bounded by gamma_N M, and the typical one is far smaller: rounding errors of random sign
    (Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019) give about sqrt(N / 3) u M for a recursive sum, less for
    the blocked sums of torch and the kernels: at most ~10 u M (N = 288) and ~18 u M (N = 926), which
    FLOOR = 64 u M covers. Where the sum cancels (M >> |y|), torch's error on one element is one draw from that
    distribution and may be arbitrarily small by luck, so "twice torch's error" alone fails the kernel for an
    equally good order: the counterexample that prompted this (tests/test_kernels_properties.py) is
    d b_dec = sum_b dL/dx_hat[b] - W_enc @ d b_enc at d_in = 1, F = 38,
    value 0.058 with M = 380 (cancellation 6600x); torch's error was 0.006 u M, the kernel's 0.048 u M: both far
    inside gamma_N M, the kernel's 8x torch's. Without cancellation M_e <= S and the rule is the old one.

    Self-check of the model: torch's own fp32 error must also satisfy |ref32 - ref64|_e <= FLOOR * M_e, else M
    misses a term (a rule measured against a wrong M would pass wrong kernels).
    """
    assert got is not None, f"{name}: no gradient"
    assert got.shape == ref64.shape and got.dtype == ref32.dtype, f"{name}: {got.shape} {got.dtype}"
    if not ref64.numel():
        return
    err = (got.detach().cpu().double() - ref64.detach().cpu()).abs()
    torch_err = (ref32.detach().cpu().double() - ref64.detach().cpu()).abs()
    S = ref64.abs().max().item() or 1.0
    scale = torch.full_like(err, S) if magnitude is None else magnitude.cpu().double().clamp(min=S)
    allowed = 2 * torch_err.max() + FLOOR * scale
    worst = int((err / allowed).argmax())
    assert (err <= allowed).all(), (
        f"{name}: error {err.flatten()[worst]:.2e} at element {worst} > 2 x torch fp32 {torch_err.max():.2e} + "
        f"{FLOOR:.1e} x {scale.flatten()[worst]:.2e} (|value| {ref64.flatten()[worst].abs():.2e})"
    )
    if magnitude is not None:
        model = FLOOR * magnitude.cpu().double()
        assert (torch_err <= model).all(), f"{name}: torch's own error exceeds 64 u x magnitude: wrong magnitude"


def dense(indices: Tensor, values: Tensor, F: int) -> Tensor:
    return torch.zeros(indices.shape[0], F, dtype=torch.float64).scatter_add_(1, indices.cpu(), values.cpu().double())


def assert_active_set(out, ref32, ref64, F: int, magnitude: Tensor | None = None) -> None:
    """Same active set and values as the reference; rows by descending value, padded with (0, 0); l0 an exact
    count in (at least) fp32, whatever the operands' dtype."""
    assert out.indices.dtype == torch.int64 and out.indices.shape == ref64.indices.shape
    assert out.l0.dtype == ref32.l0.dtype == torch.float32 and torch.equal(out.l0.cpu(), ref32.l0.cpu())
    used = torch.arange(out.indices.shape[1])[None, :] < out.l0.cpu()[:, None]
    assert torch.equal(dense(out.indices, used.double(), F) > 0, dense(ref64.indices, ref64.values, F) > 0)
    assert_matches("values", dense(out.indices, out.values, F), dense(ref32.indices, ref32.values, F),
                   dense(ref64.indices, ref64.values, F), magnitude)  # fmt: skip
    v = out.values.cpu()
    assert (v[:, :-1] >= v[:, 1:]).all(), "values not in descending order"
    assert (v[~used] == 0).all() and (out.indices.cpu()[~used] == 0).all() and (v[used] > 0).all()


def assert_step_matches_reference(case: dict[str, Tensor], eps: float, kind: str, *, grad_x: bool = False,
                                  compute_dtype: torch.dtype | None = None, forward=kernel_forward, **kw):  # fmt: skip
    """The kernels' forward and backward (`forward`, default the small test tiles) on `case` (fp32 parameters)
    against the reference with the same `compute_dtype` in fp32 and fp64: x_hat, the active set and every gradient
    (in fp32), by `assert_matches` with `magnitudes`. kw go to `forward`. Returns the kernels' (outputs, grads)."""
    cd = {} if compute_dtype is None else {"compute_dtype": compute_dtype}
    out, grads = run(forward, case, eps, kind, grad_x=grad_x, **cd, **kw)
    ref32, rgrads32 = run(R.sae_forward, case, eps, kind, grad_x=grad_x, **cd)
    ref64, rgrads64 = run(R.sae_forward, case, eps, kind, torch.float64, grad_x=grad_x, **cd)
    mags = magnitudes(case, eps, kind)
    assert out.x_hat.dtype == torch.float32
    assert_matches("x_hat", out.x_hat, ref32.x_hat, ref64.x_hat, mags["x_hat"])
    assert_active_set(out, ref32, ref64, case["W_enc"].shape[1], mags["values"])
    for name in rgrads64:
        assert_matches(f"d {name}", grads[name], rgrads32[name], rgrads64[name], mags[name])
    return out, grads


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a launcher leaves uninitialised starts as NaN (floats) or -1 (indices)."""

    def empty(shape, dtype, device):
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)

    monkeypatch.setattr(launch, "empty", empty)
