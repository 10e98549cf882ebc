"""On a CUDA device: the compiled kernels against the reference in fp32 and bf16, at the H100 tile sizes.

Skipped without CUDA (the CPU runs the same comparisons in Triton's interpreter: fp32 and fp16 only, small tiles).
tests/gpu/run_gpu_checks.sh runs this file together with every device-agnostic kernel test file, which on a GPU
run compiled too (tests/test_kernels_common.py picks the device): one call for the whole GPU check.

Shapes are odd and straddle the default tiles (encode 64 rows x 128 latents x 64 d_in, 32-slot / 32-pair x 128
d_in elsewhere) and the small test tiles. They keep the chain's rounding count N = 2 (B + D + F) + 8 under ~1000,
where the precision rule's floor of 64 u M is derived to hold (tests/test_kernels_common.py `assert_matches`).
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device: these tests compile the Triton kernels for it", allow_module_level=True)

from kernels import sae_step  # noqa: E402
from kernels.sae_pipeline import Blocks  # noqa: E402
from tests.test_kernels_common import (  # noqa: E402, F401 (poisoned is a fixture)
    BLOCKS,
    DEVICE,
    INTERPRET,
    PARAMS,
    R,
    assert_step_matches_reference,
    magnitudes,
    make_case,
    poisoned,
    run,
)
from tests.test_kernels_mixed import rounding_bound, same_decisions_case  # noqa: E402

SHAPES = [(1, 65, 257, "l0", True), (97, 77, 131, "target_l0", False), (130, 129, 200, "l0", True),
          (65, 63, 129, "mse", False), (33, 17, 67, "l0_only", False)]  # fmt: skip
TILES = {"h100": Blocks(), "small": BLOCKS}
EPS = 0.25


def forward_with(tiles: Blocks):
    def forward(*args, **kw):
        return sae_step.sae_forward_sparse(*args, blocks=tiles, **kw)

    return forward


def test_the_kernels_are_compiled_not_interpreted():
    assert not INTERPRET and DEVICE == "cuda"
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}")


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("B, D, F, kind, grad_x", SHAPES)
def test_kernels_match_the_reference(B, D, F, kind, grad_x, compute_dtype, tiles, poisoned):
    """Outputs and every gradient (x included where marked) against the reference at the same compute_dtype
    (fp32 and fp64 accumulation), NaN-poisoned buffers: the fp32 precision rule in both cases, since with bf16
    both sides round the same operands and differ only in summation order (bf16 products are exact in fp32)."""
    case = make_case(B, D, F, seed=B * 1000 + D * 10 + F, compute_dtype=compute_dtype)
    out, grads = assert_step_matches_reference(case, EPS, kind, grad_x=grad_x, compute_dtype=compute_dtype,
                                               forward=forward_with(TILES[tiles]))  # fmt: skip
    assert all(g.dtype == torch.float32 for g in grads.values()) and out.l0.dtype == torch.float32


@pytest.mark.parametrize("B, D, F, kind", [(9, 65, 129, "l0"), (5, 129, 257, "target_l0")])
def test_bf16_kernels_are_within_the_rounding_bound_of_the_exact_result(B, D, F, kind, poisoned):
    """The bf16 kernels against the exact fp64 computation WITHOUT rounding: the same decisions (margins beyond
    the rounding's reach) and every output and gradient within `rounding_bound` (7 bf16 roundoffs of the
    magnitude plus N fp32 ones): what a user of compute_dtype=bfloat16 gets, bounded."""
    case = same_decisions_case(B, D, F, seed=B + D + F, compute_dtype=torch.bfloat16)
    out, grads = run(forward_with(Blocks()), case, 1.0, kind, compute_dtype=torch.bfloat16)
    exact, exact_grads = run(R.sae_forward, case, 1.0, kind, torch.float64)
    mags = magnitudes(case, 1.0, kind)
    assert torch.equal(out.l0.double(), exact.l0)
    for name, got, want in [("x_hat", out.x_hat, exact.x_hat)] + [(k, grads[k], exact_grads[k]) for k in PARAMS]:
        err = (got.double() - want).abs().cpu()
        assert (err <= rounding_bound(mags[name], torch.bfloat16, B, D, F)).all(), (name, float(err.max()))


def test_theta_is_checked_on_the_device_without_an_extra_sync():
    """On CUDA the host-side check cannot see theta; the kernels and the reference read it with what they read
    back anyway (kernels/validate.py)."""
    case = {k: v.to(DEVICE) for k, v in make_case(5, 9, 40, seed=1).items()}
    case["threshold"][7] = 0.0
    args = [case[k] for k in ("x", *PARAMS)]
    for forward in (sae_step.sae_forward, R.sae_forward):
        with pytest.raises(ValueError, match="latent 7 = 0.0"):
            forward(*args, EPS)
