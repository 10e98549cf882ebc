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
from kernels.sae_step import Blocks  # noqa: E402
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

# Precision rule (flash-attention's): the kernel's error against the fp64 reference, relative to the
# reference's largest element, may be at most twice the error of PyTorch computing the same thing in fp32,
# plus a floor of 2^-18 (64 fp32 roundoffs): the kernels sum in another order than torch, nothing more.
FLOOR = 2.0**-18


def make_case(
    B: int, D: int, F: int, seed: int, eps: float = 0.25, margin: float = 1e-4, crowd: bool = True,
    operands: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """fp32 inputs (CPU) where no pre-activation lies within `margin` of a decision boundary (z = theta,
    z = theta +- eps/2), so the kernels' and the references' masks agree despite rounding.

    With `crowd` (and F >= 5), latents 0-2 fire in nearly every row and latents 3-4 sit inside the window in every row
    (3 active, 4 not), so the latent-major kernels see more pairs per latent than one block holds.
    x, W_enc and W_dec are rounded to `operands` (still returned as fp32).
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
    z = (x.double() - b_dec.double()) @ W_enc.double() + b_enc.double()
    for _ in range(100):
        d = z - theta.double()
        bad = ((d.abs() < margin) | ((d.abs() - eps / 2).abs() < margin)).any(0)
        if not bad.any():
            return {"x": x, "W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": theta}
        theta = torch.where(bad, theta + (torch.rand(F, generator=g) - 0.5) * max(eps, 100 * margin) / 10, theta)
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


def rel_err(got: Tensor, ref64: Tensor) -> float:
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    return (got.cpu().double() - ref64.cpu()).abs().max().item() / (scale or 1.0) if ref64.numel() else 0.0


def assert_matches(name: str, got: Tensor, ref32: Tensor, ref64: Tensor) -> None:
    assert got is not None, f"{name}: no gradient"
    assert got.shape == ref64.shape and got.dtype == ref32.dtype, f"{name}: {got.shape} {got.dtype}"
    err, torch_err = rel_err(got, ref64), rel_err(ref32, ref64)
    assert err <= 2 * torch_err + FLOOR, f"{name}: error {err:.2e} > 2 x torch fp32 {torch_err:.2e} + {FLOOR:.1e}"


def dense(indices: Tensor, values: Tensor, F: int) -> Tensor:
    return torch.zeros(indices.shape[0], F, dtype=torch.float64).scatter_add_(1, indices.cpu(), values.cpu().double())


def assert_active_set(out, ref32, ref64, F: int) -> None:
    """Same active set and values as the reference; rows by descending value, padded with (0, 0)."""
    assert out.indices.dtype == torch.int64 and out.indices.shape == ref64.indices.shape
    assert torch.equal(out.l0.cpu(), ref32.l0.cpu())
    used = torch.arange(out.indices.shape[1])[None, :] < out.l0.cpu()[:, None]
    assert torch.equal(dense(out.indices, used.double(), F) > 0, dense(ref64.indices, ref64.values, F) > 0)
    assert_matches("values", dense(out.indices, out.values, F), dense(ref32.indices, ref32.values, F),
                   dense(ref64.indices, ref64.values, F))  # fmt: skip
    v = out.values.cpu()
    assert (v[:, :-1] >= v[:, 1:]).all(), "values not in descending order"
    assert (v[~used] == 0).all() and (out.indices.cpu()[~used] == 0).all() and (v[used] > 0).all()


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a launcher leaves uninitialised starts as NaN (floats) or -1 (indices)."""

    def empty(shape, dtype, device):
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)

    monkeypatch.setattr(launch, "empty", empty)
