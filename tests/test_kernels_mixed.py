"""Mixed precision (`compute_dtype`): 16-bit products, fp32 accumulation, fp32 master weights and thresholds.

Two oracles:

- the same rounding: the kernels with compute_dtype against `kernels.reference.sae_forward` with the same
  compute_dtype (its fp64 run rounds the same operands and accumulates in fp64), under the fp32 precision rule
  of tests/test_kernels_common.py: the kernels and the reference then differ only in summation order;
- no rounding: the compute_dtype reference against the exact fp64 computation, within `rounding_bound`.

Triton's interpreter cannot read bf16 (PLATFORM.md), so on the CPU the kernels' 16-bit path runs with float16:
the same code, the same casts and the same kept copies, with a smaller rounding unit. On a GPU the same tests run
with bfloat16 as well (COMPUTE_16); the reference runs bf16 anywhere.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sae.model import JumpReLUSAE, OperandCache
from tests.test_kernels_common import (  # noqa: F401 (poisoned is a fixture); sets TRITON_INTERPRET
    BLOCKS,
    DEVICE,
    INTERPRET,
    PARAMS,
    U32,
    R,
    assert_matches,
    assert_step_matches_reference,
    dense,
    magnitudes,
    make_case,
    poisoned,
    run,
)

COMPUTE_16 = [torch.float16] if INTERPRET else [torch.float16, torch.bfloat16]
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff: half the distance from 1 to the next
EPS = 0.25

# Operand roundings on the longest chain to each output, each at most UNIT relative (first order):
#   z: x, x - b_dec, W_enc (3)   x_hat: + W_dec (4)   dL/dx_hat: as x_hat (4; the loss reads the un-rounded x)
#   dz, d theta: + W_dec (5)   d b_dec, d x: + W_enc (6)   d W_enc: dz and x - b_dec (7)   d W_dec: f and g (7)
ROUNDINGS = 7


def rounding_bound(magnitude: torch.Tensor, compute_dtype: torch.dtype, B: int, D: int, F: int) -> torch.Tensor:
    """|y(compute_dtype) - y(exact)| <= (ROUNDINGS * UNIT + N * u32) * M elementwise, M from `magnitudes`.

    Each product's operands are rounded once, to relative error <= UNIT; to first order an output's error is then
    sum over the rounded operands of (partial derivative x operand x its relative error), bounded by the number
    of rounded factors on the output's longest chain (ROUNDINGS) times UNIT times the magnitude M, the sum of the
    |terms|. The reduction length enters only through the fp32 accumulation, gamma_N <= N u32 with the chain's
    N = 2 (B + D + F) + 8 roundings (tests/test_kernels_common.py `assert_matches`): for the test shapes 2e-5 M,
    small beside 7 UNIT = 2.7e-2 M (bf16) or 3.4e-3 M (fp16). With bf16 accumulation instead it would be
    N * 2^-8 (e.g. 1.1 M at N = 288): what a kernel that summed in bf16 would exceed.
    """
    N = 2 * (B + D + F) + 8
    return (ROUNDINGS * UNIT[compute_dtype] + N * U32) * magnitude.cpu().double()


def same_decisions_case(B: int, D: int, F: int, seed: int, compute_dtype: torch.dtype, eps: float = 1.0):
    """A case where rounding cannot flip a decision: no pre-activation within 3 UNIT max(z~) (the bound on its
    rounding error, z~ = (|x| + |b_dec|) @ |W_enc| + |b_enc|) of a boundary. z~ does not depend on theta, the
    only thing `make_case` moves, so it is computed on a first draw of the same seed."""
    c = make_case(B, D, F, seed, eps, margin=0.0, crowd=False)
    z_mag = (c["x"].abs() + c["b_dec"].abs()).double() @ c["W_enc"].abs().double() + c["b_enc"].abs().double()
    margin = 3 * UNIT[compute_dtype] * float(z_mag.max()) * 1.01
    return make_case(B, D, F, seed, eps, margin=margin, crowd=False)


@pytest.mark.parametrize("compute_dtype", COMPUTE_16)
@pytest.mark.parametrize(
    "B, D, F, kind, grad_x",
    [(1, 17, 63, "l0", False), (33, 17, 67, "target_l0", True), (33, 15, 63, "l0", False), (7, 17, 67, "mse", True)],
)
def test_kernels_match_the_reference_at_the_same_compute_dtype(B, D, F, kind, grad_x, compute_dtype, poisoned):
    """fp32 x and parameters (not 16-bit exact, so the casts are exercised) with compute_dtype: outputs and every
    gradient in fp32, under the fp32 precision rule against the reference that rounds the same operands."""
    case = make_case(B, D, F, seed=B * 1000 + D * 10 + F, compute_dtype=compute_dtype)
    assert not torch.equal(case["W_dec"].to(compute_dtype).float(), case["W_dec"])  # the rounding is not a no-op
    out, grads = assert_step_matches_reference(case, EPS, kind, grad_x=grad_x, compute_dtype=compute_dtype)
    assert all(g.dtype == torch.float32 for g in grads.values())
    # Against the computation without rounding, the difference is the rounding's, not the summation order's.
    ref, _ = run(R.sae_forward, case, EPS, kind)
    assert (out.x_hat - ref.x_hat).abs().max() > 100 * U32 * ref.x_hat.abs().max()


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, D, F, kind", [(6, 12, 40, "l0"), (5, 20, 33, "target_l0"), (2, 1, 9, "l0")])
def test_the_reference_at_compute_dtype_is_within_the_rounding_bound(B, D, F, kind, compute_dtype):
    """The reference with compute_dtype (fp32 parameters, fp32 accumulation) against the exact fp64 computation
    without rounding: the same decisions, and every output and gradient within `rounding_bound`."""
    case = same_decisions_case(B, D, F, seed=B + D + F, compute_dtype=compute_dtype)
    low, low_grads = run(R.sae_forward, case, 1.0, kind, compute_dtype=compute_dtype)
    exact, exact_grads = run(R.sae_forward, case, 1.0, kind, torch.float64)
    mags = magnitudes(case, 1.0, kind)
    assert low.l0.dtype == torch.float32 and torch.equal(low.l0.double(), exact.l0)
    fired = [dense(out.indices, out.values, F) > 0 for out in (low, exact)]
    assert torch.equal(*fired)  # the same active sets (their order by value may differ)
    for name, got, want in [("x_hat", low.x_hat, exact.x_hat)] + [(k, low_grads[k], exact_grads[k]) for k in PARAMS]:
        assert got.dtype == torch.float32, name  # fp32 results and gradients: the masters' dtype
        err = (got.double() - want).abs()
        assert (err <= rounding_bound(mags[name], compute_dtype, B, D, F)).all(), (name, float(err.max()))
    assert exact.l0.sum() > 0 and (low.x_hat.double() - exact.x_hat).abs().max() > 0  # not vacuous


def test_the_model_keeps_fp32_master_weights_on_the_reference_backend():
    """Dense training steps with compute_dtype=bfloat16 (reference backend, torch Adam): parameters, gradients,
    optimizer state, x_hat and l0 all stay fp32; the forward is the reference's at that compute_dtype."""
    model = JumpReLUSAE(12, 40, bandwidth=0.05, compute_dtype=torch.bfloat16)
    model.init_tied(0.3, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.999))
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        out = model(x)
        assert out.x_hat.dtype == out.l0.dtype == torch.float32
        ((out.x_hat - x).pow(2).sum(-1).mean() + 0.01 * out.l0.mean()).backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        opt.step()
        opt.zero_grad()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(s["exp_avg_sq"].dtype == torch.float32 for s in opt.state.values())
    with torch.no_grad():
        params = [getattr(model, k) for k in PARAMS]
        want = R.sae_forward(x, *params, 0.05, compute_dtype=torch.bfloat16)
        assert torch.equal(model(x).x_hat, want.x_hat)
        assert not torch.equal(want.x_hat, R.sae_forward(x, *params, 0.05).x_hat)


def test_operand_cache_follows_every_write_to_the_masters():
    """Kept copies equal the masters rounded; a write the cache is told about (`refresh`) costs no full cast,
    any other in-place write (optimizer step, checkpoint load, init) is caught by the version counter."""
    model = JumpReLUSAE(6, 10, compute_dtype=torch.bfloat16)
    model.init_tied(0.1, torch.Generator().manual_seed(0))
    cache = model.operand_cache
    assert isinstance(cache, OperandCache) and JumpReLUSAE(6, 10).operand_cache is None

    def consistent():
        W_enc, W_dec = cache.get(model)
        return torch.equal(W_enc, model.W_enc.detach().bfloat16()) and torch.equal(
            W_dec, model.W_dec.detach().bfloat16()
        )

    assert consistent() and cache.full_casts == 2
    touched = torch.tensor([1, 7])
    with torch.no_grad():  # what sparse_train_step does: write the touched latents, then refresh them
        model.W_dec.index_copy_(0, touched, model.W_dec.index_select(0, touched) * 1.001)
        model.W_enc.index_copy_(1, touched, model.W_enc.index_select(1, touched) * 0.999)
    cache.refresh(model, touched)
    assert consistent() and cache.full_casts == 2
    with torch.no_grad():
        model.W_enc.add_(1e-3)  # a write the cache was not told about
    assert consistent() and cache.full_casts == 3
    state = {k: v * 1.01 for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # copy_ into both masters
    assert consistent() and cache.full_casts == 5
    moved = copy.deepcopy(model)  # a copy starts empty and makes its own copies
    assert moved.operand_cache.full_casts == 0 and moved.operand_cache.get(moved)[0].data_ptr() != cache.get(
        model)[0].data_ptr()  # fmt: skip
    with torch.no_grad():
        model.W_dec.data = model.W_dec.data.clone()  # a `.data` swap (what Module.to does): new storage
    assert consistent() and cache.full_casts == 6


@pytest.mark.parametrize("compute_dtype", COMPUTE_16)
def test_one_sparse_step_compact_grads_match_autograd_at_compute_dtype(compute_dtype, poisoned):
    """`sparse_loss_and_grads` with compute_dtype (and with kept operand copies) against autograd through the
    reference at the same compute_dtype, compacted to `touched`: fp32 gradients under the fp32 precision rule."""
    from kernels.sparse_grads import sparse_loss_and_grads
    from sae.objectives import Objective
    from sae.sparse_step import LATENT_DIMS

    B, D, F, kind, eps = 33, 17, 67, "target_l0", 0.05
    case = make_case(B, D, F, seed=11, eps=eps, compute_dtype=compute_dtype)
    args = [case[k].to(DEVICE) for k in ("x", *PARAMS)]
    kept = (args[1].to(compute_dtype), args[3].to(compute_dtype))
    objective = Objective(kind, 0.3, 5.0)
    outs = [sparse_loss_and_grads(*args, eps, objective, compute_dtype=compute_dtype, operands=ops,
                                  capacity=16, window_capacity=16, blocks=BLOCKS) for ops in (None, kept)]  # fmt: skip
    _, g32 = run(R.sae_forward, case, eps, kind, compute_dtype=compute_dtype)
    _, g64 = run(R.sae_forward, case, eps, kind, torch.float64, compute_dtype=compute_dtype)
    mags = magnitudes(case, eps, kind)
    t = outs[0].touched.cpu()
    for name in PARAMS:
        dim = LATENT_DIMS[name]
        r32, r64, m = (
            g.cpu() if dim is None else g.cpu().index_select(dim, t) for g in (g32[name], g64[name], mags[name])
        )
        for out in outs:
            assert_matches(f"d {name}", out.grads._asdict()[name], r32, r64, m)
    assert torch.equal(outs[0].grads.W_enc, outs[1].grads.W_enc)
    with pytest.raises(ValueError, match="the W_dec copy is torch.float32"):
        sparse_loss_and_grads(*args, eps, objective, compute_dtype=compute_dtype, operands=(kept[0], args[3]))


def test_compute_dtype_names_resolve_and_refuse_what_cannot_run():
    from sae.errors import ConfigError
    from sae.ops import COMPUTE_DTYPES, resolve_compute_dtype

    assert resolve_compute_dtype("bfloat16", "reference") is torch.bfloat16
    assert resolve_compute_dtype("float32", "triton") is torch.float32
    assert set(COMPUTE_DTYPES) == {"float32", "bfloat16", "float16"}
    with pytest.raises(ConfigError, match="unknown compute dtype 'fp8'"):
        resolve_compute_dtype("fp8", "reference")
    if INTERPRET:
        with pytest.raises(ConfigError, match="use float16 to exercise the 16-bit kernel path"):
            resolve_compute_dtype("bfloat16", "triton")
