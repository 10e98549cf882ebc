"""The fused encode with 16-bit operands against a plain 16-bit GEMM of the same shape (issue 12: the fused encode
at >= 75% of the throughput of `x @ W_enc`).

    encode/<size>/triton-bf16   `kernels.jumprelu_encode.jumprelu_encode` on bf16 x [B, D] and W_enc [D, F] beside
                                fp32 b_enc, b_dec and thresholds, as the compute_dtype = bf16 training step calls it;
                                the bf16 copies are made before timing (the step keeps W_enc's, and casts x once)
    encode/<size>/gemm-bf16     torch.mm(x, W_enc) on the same bf16 operands, bf16 [B, F] output (cuBLAS): the
                                product alone, no bias, no threshold, no compaction: what a fused epilogue can approach

Speed-ups (tokens/s) of both are against gemm-bf16: for triton-bf16, the fraction of the plain GEMM's throughput.
`encode_case(size, kind, torch.float16)` makes the same cases with fp16 operands (`-fp16`), which Triton's
interpreter can read: the tests check the 16-bit encode path that way on the CPU.

Checks, on the first `check_rows` rows of the case's data (the interpreter shape for the kernel on the CPU):
- triton-bf16: against oracles that round the same operands (`kernels.reference.encode` at compute_dtype, in
  float32, and z16 of bench/synthetic.py in float64, whose decisions the check rows keep clear of): the active
  set, L0, window pairs and fire counts exactly, the active values by the precision rule (bench/checks.py).
- gemm-bf16: against the float64 product of the same rounded operands. Its output is rounded to bf16 (relative
  error UNIT = 2^-8 of each element) after an fp32 sum: |got - y| <= UNIT |y32| + |y32 - y| with y32 the fp32 sum,
  so the scaled error may be UNIT (1 + e) + e with e the fp32 sum's error (scaled), bounded as the precision rule
  does by twice torch's own float32 error plus FLOOR. Checked with cuBLAS's reduced-precision split-K reductions
  off (bench/cases_step.py `full_precision_reductions`); timed with torch's defaults.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bench import counts
from bench.cases_step import full_precision_reductions
from bench.checks import FLOOR, UNIT, Check, Comparison, scaled_err
from bench.env import Env, Workload
from bench.registry import Case, profiles_for
from bench.shapes import SAE_SIZES
from bench.synthetic import SAEData, capacity_after, pre_activations, slots_to_dense
from kernels import reference as R

SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_COLUMNS = 2**16


def _operands(data: SAEData, rows: int, low: torch.dtype) -> tuple[Tensor, Tensor]:
    """x[:rows] and W_enc rounded to `low` (contiguous copies)."""
    return data.x[:rows].to(low).contiguous(), data.W_enc.to(low).contiguous()


def _z16(x: Tensor, data: SAEData, low: torch.dtype, dtype: torch.dtype) -> Tensor:
    """z = r(r(x) - b_dec) r(W_enc) + b_enc [R, F] in `dtype`, in latent chunks (bench/synthetic.py)."""
    F = data.shape.F
    z = torch.empty(x.shape[0], F, dtype=dtype, device=x.device)
    for c0 in range(0, F, _COLUMNS):
        cols = slice(c0, min(F, c0 + _COLUMNS))
        z[:, cols] = pre_activations(x, data.b_dec, data.W_enc, data.b_enc, cols, dtype, low)
    return z


def _encode(x: Tensor, W: Tensor, data: SAEData, capacity: int | None = None, window: int | None = None):
    from kernels.jumprelu_encode import jumprelu_encode

    return jumprelu_encode(x, W, data.b_enc, data.b_dec, data.threshold, data.shape.eps, capacity, window)


def _check_triton(size: str, low: torch.dtype) -> Callable[[Env], Check]:
    def check(env: Env) -> Check:
        data = env.sae_data(env.check_shape(SAE_SIZES[size], triton=True))
        F, eps, R_ = data.shape.F, data.shape.eps, data.check_rows
        x = data.x[:R_].contiguous()
        got = _encode(*_operands(data, R_, low), data)
        z64, theta64 = _z16(x, data, low, torch.float64), data.threshold.double()
        acts64 = R.jumprelu(z64, theta64, eps)
        with torch.no_grad():
            ref32 = R.encode(x, data.W_enc, data.b_enc, data.b_dec, data.threshold, eps, compute_dtype=low)
        u = (z64 - theta64) / eps
        cmp = Comparison(f"B={R_} D={data.shape.D} F={F}, {SHORT[low]} operands")
        cmp.exact("active set", slots_to_dense(got.indices, got.counts, F), acts64 > 0)
        cmp.exact("l0", got.counts.long(), R.step(z64, theta64, eps).sum(-1).long())
        cmp.rule("values", slots_to_dense(got.indices, got.counts, F, got.values), ref32.acts, acts64)
        cmp.exact("window pairs", slots_to_dense(got.window, got.window_counts, F), (u > -0.5) & (u < 0.5))
        cmp.exact("fire counts", got.fire_counts.long(), (acts64 > 0).sum(0))
        return cmp.result()

    return check


def _check_gemm(size: str, low: torch.dtype) -> Callable[[Env], Check]:
    def check(env: Env) -> Check:
        data = env.sae_data(SAE_SIZES[size])
        x, W = _operands(data, data.check_rows, low)
        with full_precision_reductions():
            got = torch.mm(x, W)
        ref64 = torch.cat([x.double() @ W[:, c0 : c0 + _COLUMNS].double() for c0 in range(0, W.shape[1], _COLUMNS)], 1)
        e32 = scaled_err(torch.mm(x.float(), W.float()), ref64)
        cmp = Comparison(f"B={x.shape[0]} D={data.shape.D} F={data.shape.F}, {SHORT[low]} operands and output")
        cmp.within(f"x @ W_enc ({SHORT[low]} output)", scaled_err(got, ref64), UNIT[low] * (1 + e32) + 2 * e32 + FLOOR)
        return cmp.result()

    return check


def _prepare(size: str, kind: str, low: torch.dtype) -> Callable[[Env], Workload]:
    def prepare(env: Env) -> Workload:
        data = env.sae_data(SAE_SIZES[size])
        B, D, F, _, _ = data.shape
        x, W = _operands(data, B, low)
        if kind == "gemm":
            return Workload(lambda: torch.mm(x, W), *counts.gemm(B, D, F, low.itemsize), B, SHORT[low])
        first = _encode(x, W, data)  # slot capacities as the trainer sets them after a first step: no re-run
        cap = capacity_after(int(first.counts.max()), F)
        wcap = capacity_after(int(first.window_counts.max()), F)
        del first
        flops, nbytes = counts.encode_sparse(B, D, F, data.mean_l0, data.mean_window, low.itemsize)
        return Workload(
            lambda: _encode(x, W, data, cap, wcap), flops, nbytes, B, SHORT[low], note=f"capacity {cap}/{wcap}"
        )

    return prepare


def encode_case(size: str, kind: str, low: torch.dtype = torch.bfloat16) -> Case:
    """`encode/<size>/<kind>-bf16` (or `-fp16`), kind "triton" or "gemm"; speed-ups against the GEMM."""
    impl = f"{kind}-{SHORT[low]}"
    check = _check_triton(size, low) if kind == "triton" else _check_gemm(size, low)
    return Case(
        "encode",
        size,
        impl,
        check,
        _prepare(size, kind, low),
        profiles_for(size, impl),
        "triton" if kind == "triton" else "torch",
        (f"gemm-{SHORT[low]}", None),
        SHORT[low],
    )


def cases() -> list[Case]:
    return [encode_case(size, kind) for size in SAE_SIZES for kind in ("triton", "gemm")]
