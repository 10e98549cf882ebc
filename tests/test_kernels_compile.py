"""Every kernel compiles for an H100 (sm_90) with the signatures the library launches, on a machine without a GPU:
all-fp32, all-bf16, and bf16 operands beside fp32 parameters (`compute_dtype=torch.bfloat16`).

The interpreter runs kernels as NumPy and misses what only the compiler checks (loop-carried types,
layouts, shared memory). Triton's wheel ships ptxas, so `triton.compile` with an explicit target builds the
cubin here. It must run with TRITON_INTERPRET unset, so the test runs this file as a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def compile_all() -> list[str]:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bench.static import i32_offset_products
    from kernels import jumprelu_encode, latent_grads, sparse_decode, threshold_grad

    def build(fn, operands: str, pointers: dict[str, str], **constexprs) -> str:
        """Pointers default to fp32, scalars to i32 (eps fp32); `pointers` overrides by name."""
        sig = {}
        for name in fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.startswith("p_"):
                sig[name] = pointers.get(name, "*fp32")
            else:
                sig[name] = "fp32" if name == "eps" else "i32"
        kernel = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32))
        wraps = i32_offset_products(kernel.asm["ttir"])
        return (
            f"{fn.__name__} ({operands[1:]} operands): {kernel.metadata.shared} B shared memory, "
            f"{wraps} i32 offset products"
        )

    done = []
    counters = {k: "*i32" for k in ("p_idx", "p_cnt", "p_win", "p_wcnt", "p_fire")}
    pairs = {k: "*i64" for k in ("p_lat", "p_orow", "p_start", "p_rows", "p_slots")}
    # Every operand in one dtype: fp32 parameters, or a model held entirely in 16 bits.
    for half, dot, precision in [("*bf16", tl.bfloat16, "tf32"), ("*fp32", tl.float32, "ieee")]:
        rows = {"p_idx": "*i64", "p_cnt": "*i32", "p_w": half}
        done += [
            build(jumprelu_encode._jumprelu_encode_kernel, half, {"p_x": half, "p_w": half, **counters},
                  OP_DTYPE=dot, DOT_DTYPE=dot, PRECISION=precision, BLOCK_B=64, BLOCK_F=128, BLOCK_D=64),
            build(sparse_decode._sparse_decode_kernel, half, {**rows, "p_out": half},
                  HAS_BIAS=True, BLOCK_K=32, BLOCK_D=128),
            build(sparse_decode._gather_dot_kernel, half, {**rows, "p_g": half}, BLOCK_K=32, BLOCK_D=128),
            *(build(latent_grads._latent_grads_kernel, half,
                    {**pairs, "p_g": half, "p_x": half, "p_dwdec": half, "p_dwenc": half},
                    HAS_ENC=has_enc, XC_DTYPE=dot, BLOCK_P=32, BLOCK_D=128) for has_enc in (True, False)),
            build(threshold_grad._threshold_grad_kernel, half, {**pairs, "p_g": half, "p_wdec": half},
                  BLOCK_P=32, BLOCK_D=128),
        ]  # fmt: skip
    # compute_dtype=bfloat16 beside fp32 master parameters (kernels.sae_step, kernels.sparse_grads): only x,
    # W_enc and W_dec (and their gathers) are bf16; dL/dx_hat, values, biases, thresholds and every output fp32.
    # These are the signatures a compute_dtype=float16 step launches under the interpreter, with bf16 for fp16.
    bf16 = {"p_idx": "*i64", "p_cnt": "*i32", "p_w": "*bf16"}
    done += [
        build(jumprelu_encode._jumprelu_encode_kernel, "*bf16+fp32", {"p_x": "*bf16", "p_w": "*bf16", **counters},
              OP_DTYPE=tl.bfloat16, DOT_DTYPE=tl.bfloat16, PRECISION="tf32", BLOCK_B=64, BLOCK_F=128, BLOCK_D=64),
        build(sparse_decode._sparse_decode_kernel, "*bf16+fp32", bf16, HAS_BIAS=True, BLOCK_K=32, BLOCK_D=128),
        # dL/dx through W_enc^T (a strided bf16 view), no bias: the launcher passes W as the unread bias pointer
        build(sparse_decode._sparse_decode_kernel, "*bf16+fp32", {**bf16, "p_bias": "*bf16"},
              HAS_BIAS=False, BLOCK_K=32, BLOCK_D=128),
        build(sparse_decode._gather_dot_kernel, "*bf16+fp32", bf16, BLOCK_K=32, BLOCK_D=128),
        build(latent_grads._latent_grads_kernel, "*bf16+fp32", {**pairs, "p_x": "*bf16"},
              HAS_ENC=True, XC_DTYPE=tl.bfloat16, BLOCK_P=32, BLOCK_D=128),
        build(threshold_grad._threshold_grad_kernel, "*bf16+fp32", {**pairs, "p_wdec": "*bf16"},
              BLOCK_P=32, BLOCK_D=128),
    ]  # fmt: skip
    return done


def test_every_kernel_compiles_for_sm90(tmp_path):
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton wheel ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    run = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("shared memory") == 18, run.stdout
    # An index product computed in 32 bits before it reaches a pointer wraps past 2^31 elements (d_in x d_sae at
    # 2^20 latents): every offset that can grow with B x F or D x F must be 64-bit (bench/static.py counts them).
    assert run.stdout.count(", 0 i32 offset products") == 18, run.stdout


if __name__ == "__main__":
    print("\n".join(compile_all()))
