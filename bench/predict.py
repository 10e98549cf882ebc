"""`python -m bench --predict`: what each kernel and each training step should cost on an H100 / H200, written down
before the first measurement (METHOD.md, "Two numbers first" and "Predict, change, measure").

Per kernel and size (B 4096, D 2304, K 64, eps 0.001 as `bench.shapes.SAE_SIZES`; F 65,536, 262,144, 2^20):

    FLOPs, bytes   the useful arithmetic and the fewest HBM bytes, from bench/counts.py and the kernels'
                   `flops_and_bytes` (the same counts the bench divides by the measured time)
    floor          max(FLOPs / matrix rate, bytes / bandwidth) at the datasheet ceilings (`H100`, `H200`)
    expected       the sum of the parts' times at the rates each part is expected to reach (`Rates`, with
                   reasons): not a floor but a guess to be proven wrong, each miss to be explained
    memory         device memory beyond the bench's shared inputs (`step_memory`, `kernel_memory`)

Two quantities that the counts take as measured are predicted here from the synthetic data's construction
(bench/synthetic.py: z ~ N(0, 1.02), thresholds at the (1 - K/F) quantile, every latent equally likely to fire):

    W  window pairs per row   F eps pdf(theta) ~ K theta eps / sigma      (0.2 at 65k: negligible bytes)
    T  touched latents        F (1 - (1 - (K + W) / F)^B)                  (0.98 F at 65k, 0.22 F at 2^20)

T decides the sparse step's optimizer bytes (72 * 4 * D * T): at 65k almost every latent is touched.
"""

from __future__ import annotations

import json
import math
from statistics import NormalDist
from typing import NamedTuple

from bench import counts
from bench.shapes import SAE_SIZES
from bench.synthetic import capacity_after

GB = 1e9
FP32, BF16 = 4, 2
SIGMA = math.sqrt(1.02)  # std of z in the synthetic data: x . w (unit column) + b_dec . w + b_enc, 0.1-scaled biases


class Ceilings(NamedTuple):
    name: str
    bf16_tflops: float  # dense tensor-core rate, fp32 accumulation
    fp32_tflops: float  # CUDA-core fp32 (no TF32: torch's default for float32 matmul, Triton's "ieee")
    hbm_tbs: float
    source: str


H100 = Ceilings("H100 SXM", 989.0, 67.0, 3.35, "datasheet: dense bf16, HBM3")
H200 = Ceilings(
    "H200",
    989.0,
    67.0,
    4.8,
    "datasheet (H200.md: the H100's rates, HBM3e); seen here (KINDS.md): cuBLAS "
    "bf16 8192^3 on random data at 769-798 TFLOP/s, a device-to-device copy at 4.3 TB/s",
)


class Rates(NamedTuple):
    """Fractions of a datasheet ceiling each kind of work is expected to reach (leads, each with its reason)."""

    cublas: float = 0.80  # cuBLAS bf16 reached 769-798 of 989 TFLOP/s on an H200 here (KINDS.md)
    cublas_fp32: float = 0.75  # torch float32 matmul without TF32: CUDA-core FFMA, a well-tuned SIMT GEMM
    stream: float = 0.85  # torch elementwise ops and copies: the copy reached 4.3 of 4.8 TB/s (0.9) here
    encode_bf16: float = 0.40  # Triton tl.dot at 64x128x64, 4 warps, 3 stages, no autotuning, and the epilogue
    # spills (255 registers and ~1.4 KB of spill stores per thread, `python -m bench --static`): Triton GEMMs at
    # such tiles reach 50-60% of cuBLAS on Hopper before spills; the epilogue's cumsum placement costs more
    encode_fp32: float = 0.50  # the same kernel with exact fp32 products (FFMA): CUDA-core bound, spills as above
    gather: float = 0.50  # Triton row gathers (decode, gather-dot, threshold): one program per row and 128-wide
    # slice of D, 1-2 iterations of a [32, 128] tile: little in flight per program, 4.6 KB rows read whole
    latent_grads: float = 0.35  # one program per (latent, 128 columns) with ~4 pairs in a 32-pair block at 65k
    # (7/8 of the lanes masked), 254 registers: latency-bound gathers of 9 KB fp32 rows
    lazy_adam: float = 0.60  # torch index_select / index_copy of [T, D] slices and ~8 elementwise passes; the
    # W_enc slices are columns of a [D, F] matrix (4-byte gathers, coalesced only where touched latents are dense)
    sparse_fixed_ms: float = 1.0  # ~30 small launches (sorts of the 262k pairs, unique, searchsorted, bincount,
    # nonzero) at 20-50 us each and ~5 device-to-host reads (.item(), .tolist()) in the step
    dense_fixed_ms: float = 0.3  # the dense step's small ops and its two reads back (max L0, the statistics)


RATES = Rates()
DENSE_BF_BYTES = 240
"""HBM bytes per [B, F] element that the dense reference step moves in its unfused elementwise ops under autograd
(fp32 and autocast alike, within ~10%), counted op by op from kernels/reference.py (docs/performance.md): forward
~60 (+ b_enc, the step's and the JumpReLU's masks, casts, the decode's operand, top-k over each row), backward ~180
(the JumpReLU's and the step's backwards each rebuild the STE window from z in ~7 passes, the step's zeros_like
gradient for z and its accumulation, the casts of dL/df and dL/dz). The minimum (bench/counts.py `step_dense`) counts
4 * elt: f and dL/dz each written and read once."""


class Part(NamedTuple):
    what: str
    flops: float
    nbytes: float
    dtype: str  # the rate its FLOPs run at: "bf16" (tensor cores) or "fp32"
    rate: float  # expected fraction of the binding ceiling
    fixed_s: float = 0.0

    def seconds(self, c: Ceilings) -> float:
        peak = c.bf16_tflops if self.dtype == "bf16" else c.fp32_tflops
        return max(self.flops / (peak * 1e12 * self.rate), self.nbytes / (c.hbm_tbs * 1e12 * self.rate)) + self.fixed_s


class Row(NamedTuple):
    kernel: str
    size: str
    dtype: str
    flops: float
    nbytes: float
    parts: tuple[Part, ...]
    memory: float  # bytes beyond the bench's shared inputs
    reason: str

    def floor(self, c: Ceilings) -> tuple[float, str]:
        """max(FLOPs / rate, bytes / bandwidth) at the ceilings, and which of the two it is."""
        peak = c.bf16_tflops if self.dtype == "bf16" else c.fp32_tflops
        compute, memory = self.flops / (peak * 1e12), self.nbytes / (c.hbm_tbs * 1e12)
        return (compute, "compute") if compute >= memory else (memory, "memory")

    def expected(self, c: Ceilings) -> float:
        return sum(p.seconds(c) for p in self.parts)


def window_pairs(K: float, F: int, eps: float) -> float:
    """W: mean STE-window pairs per row, F eps pdf(theta) with theta the (1 - K/F) quantile of N(0, SIGMA^2)."""
    q = NormalDist().inv_cdf(1.0 - K / F)
    return F * eps * NormalDist().pdf(q) / SIGMA


def touched_latents(B: int, F: int, K: float, W: float) -> float:
    """T: latents that fire or have a window pair in some row, each with probability (K + W) / F per row."""
    return F * (1.0 - (1.0 - (K + W) / F) ** B)


def _gather(B: int, D: int, K: int, elt: int) -> tuple[int, int]:
    """One K-row gather per token (decode, gather-dot, dL/dx), as `kernels.sae_step.flops_and_bytes` counts it."""
    return 2 * B * K * D, B * K * D * elt + B * D * 4


def sparse_step_parts(B: int, D: int, F: int, K: int, W: float, T: float, elt: int) -> tuple[Part, ...]:
    """The sparse step's parts, summing to `counts.step_sparse` (FLOPs and bytes) plus the fixed cost."""
    from kernels import latent_grads, threshold_grad

    dtype = "bf16" if elt < FP32 else "fp32"
    flops, nbytes = counts.encode_sparse(B, D, F, K, W, elt)
    gflops, gbytes = _gather(B, D, K, elt)
    parts = [
        Part("fused encode", flops, nbytes, dtype, RATES.encode_bf16 if elt < FP32 else RATES.encode_fp32),
        Part("3 row gathers", 3 * gflops, 3 * gbytes, "fp32", RATES.gather),
        Part("latent grads", *latent_grads.flops_and_bytes(B, D, F, K), "fp32", RATES.latent_grads),
        Part("threshold grad", *threshold_grad.flops_and_bytes(B, D, F, round(W)), "fp32", RATES.gather),
        Part("LazyAdam + projection + renorm", 10 * 2 * D * T, 72 * 4 * D * T, "fp32", RATES.lazy_adam),
    ]
    if elt < FP32:
        parts.append(
            Part("bf16 casts (x, touched copies)", 0, (B * D + 2 * T * D) * (FP32 + elt), "fp32", RATES.stream)
        )
    parts.append(Part("small ops, syncs", 0, 0, "fp32", 1.0, RATES.sparse_fixed_ms * 1e-3))
    return tuple(parts)


def dense_step_parts(B: int, D: int, F: int, elt: int) -> tuple[Part, ...]:
    """The dense reference step's parts: its 6 GEMMs, its unfused [B, F] ops, torch's Adam, autocast's casts."""
    bf16 = elt < FP32
    parts = [
        Part(
            "6 GEMMs",
            12 * B * D * F,
            2 * elt * B * D + 4 * elt * D * F + 4 * elt * B * F,
            "bf16" if bf16 else "fp32",
            RATES.cublas if bf16 else RATES.cublas_fp32,
        ),
        Part("[B, F] elementwise", 0, DENSE_BF_BYTES * B * F, "fp32", RATES.stream),
        Part("Adam + projection + renorm", 10 * 2 * D * F, 58 * 4 * D * F, "fp32", RATES.stream),
    ]
    if bf16:
        parts.append(Part("autocast weight casts", 0, 2 * (FP32 + elt) * D * F, "fp32", RATES.stream))
    parts.append(Part("small ops, syncs", 0, 0, "fp32", 1.0, RATES.dense_fixed_ms * 1e-3))
    return tuple(parts)


def step_memory(B: int, D: int, F: int, T: float, elt: int, dense: bool) -> float:
    """Peak device memory of one step beyond the bench's shared inputs (its own model copy included).

    Both: the model's fp32 parameters P = (2 D F + 2 F + D) * 4 bytes.
    Sparse: LazyAdam's second moments (P again; beta1 = 0 keeps no first moment), the bf16 copies of W_enc and
        W_dec (2 D F * 2, `OperandCache`), the compact gradients (2 T D * 4) and LazyAdam's transients for one
        matrix (its gathered [T, D] slices of parameter and moment, sqrt and denominator: 4 T D * 4), x's copies.
    Dense: gradients (P), Adam's two moments (2 P), autocast's weight casts (2 D F * elt); of [B, F] tensors
        the saved z and f (fp32: 8 bytes per element; autocast: z fp32 + f bf16, 6) and ~4 fp32 transients of
        the backward (grad_f, grad_z, the window and its product: 16).
    """
    params = (2 * D * F + 2 * F + D) * FP32
    if not dense:
        copies = 2 * D * F * elt if elt < FP32 else 0
        return 2 * params + copies + 2 * T * D * FP32 + 4 * T * D * FP32 + B * D * (FP32 + elt)
    casts = 2 * D * F * elt if elt < FP32 else 0
    saved = 8 if elt == FP32 else 6
    return 4 * params + casts + (saved + 16) * B * F


def kernel_memory(kernel: str, B: int, D: int, F: int, K: int, elt: int) -> float:
    """Memory a kernel case allocates beyond the bench's shared fp32 inputs (its operand copies and outputs)."""
    cap = capacity_after(round(K + 4 * math.sqrt(K)), F)  # slots per row after a step whose max L0 is ~K + 4 sigma
    copies = (B * D + D * F) * elt if elt < FP32 else 0
    if kernel == "fused encode":
        return copies + B * cap * 12 + F * 4 + B * 8
    if kernel == "plain GEMM x @ W_enc":
        return copies + B * F * elt
    if kernel == "dense encode (reference)":  # z, the JumpReLU's bool and fp32 masks and f, under no_grad
        return (4 + 1 + 4 + 4) * B * F
    if kernel == "dense threshold grad (reference)":  # the saved z, the window, dL/df and their product
        return (4 + 4 + 4 + 4) * B * F
    if kernel == "sparse decode fwd+bwd":  # the dense [F, D] decoder gradient autograd returns
        return F * D * FP32 + 3 * B * D * FP32
    return B * K * 16 + F * 4  # gather-dot, latent grads, threshold grad: pair lists, [B, K] and [F] outputs


def _kernel_rows(size: str) -> list[Row]:
    from kernels import latent_grads, threshold_grad

    B, D, F, K, eps = SAE_SIZES[size]
    W = window_pairs(K, F, eps)
    out = []

    def add(kernel: str, dtype: str, cost: tuple[float, float], part: Part, reason: str, elt: int = FP32) -> None:
        out.append(Row(kernel, size, dtype, *cost, (part,), kernel_memory(kernel, B, D, F, K, elt), reason))

    for elt, dt, rate in ((BF16, "bf16", RATES.encode_bf16), (FP32, "fp32", RATES.encode_fp32)):
        cost = counts.encode_sparse(B, D, F, K, W, elt)
        add(
            "fused encode",
            dt,
            cost,
            Part("encode", *cost, dt, rate),
            "compute-bound (2B FLOPs per W_enc element read); Triton tile 64x128x64, 4 warps, spilling epilogue",
            elt,
        )
    cost = counts.gemm(B, D, F, BF16)
    add(
        "plain GEMM x @ W_enc",
        "bf16",
        cost,
        Part("gemm", *cost, "bf16", RATES.cublas),
        "cuBLAS at the rate seen on the H200 here; writing its bf16 [B, F] output overlaps the product",
        BF16,
    )
    cost = counts.encode_dense(B, D, F)
    add(
        "dense encode (reference)",
        "fp32",
        cost,
        Part("encode", cost[0], cost[1] + 9 * B * F, "fp32", RATES.cublas_fp32),
        "fp32 cuBLAS GEMM, then ~9 bytes per [B, F] element of mask passes (no_grad)",
    )
    cost = _gather(B, D, K, BF16)
    add(
        "sparse decode (forward)",
        "bf16",
        cost,
        Part("gather", *cost, "fp32", RATES.gather),
        "memory-bound row gather (K bf16 decoder rows per token)",
    )
    add("gather-dot", "bf16", cost, Part("gather", *cost, "fp32", RATES.gather), "memory-bound, as the decode")
    cost = latent_grads.flops_and_bytes(B, D, F, K)
    add(
        "latent grads",
        "fp32",
        cost,
        Part("pairs", *cost, "fp32", RATES.latent_grads),
        "memory-bound gathers of fp32 g and x rows per pair; few pairs per latent, masked lanes",
    )
    cost = threshold_grad.flops_and_bytes(B, D, F, round(W))
    add(
        "threshold grad",
        "fp32",
        cost,
        Part("window", *cost, "fp32", RATES.gather, 10e-6),
        "a few hundred window pairs per batch: one launch (~10 us)",
    )
    cost = counts.decode(B, D, F, K)
    add(
        "sparse decode fwd+bwd",
        "fp32",
        cost,
        Part("decode", *cost, "fp32", RATES.gather),
        "bench case decode/*/triton: the zero-filled dense [F, D] decoder gradient dominates at 2^20",
    )
    return out


def _step_rows(size: str) -> list[Row]:
    B, D, F, K, eps = SAE_SIZES[size]
    W = window_pairs(K, F, eps)
    T = touched_latents(B, F, K, W)
    out = []
    for elt, dt in ((BF16, "bf16"), (FP32, "fp32")):
        out += [
            Row(
                "sparse step + LazyAdam",
                size,
                dt,
                *counts.step_sparse(B, D, F, K, W, round(T), elt),
                sparse_step_parts(B, D, F, K, W, T, elt),
                step_memory(B, D, F, T, elt, dense=False),
                f"T = {T / F:.2f} F touched latents: the optimizer's 72 * 4 * D * T bytes weigh most",
            ),
            Row(
                "dense reference step",
                size,
                dt,
                *counts.step_dense(B, D, F, elt),
                dense_step_parts(B, D, F, elt),
                step_memory(B, D, F, T, elt, dense=True),
                f"{DENSE_BF_BYTES} B per [B, F] element of unfused autograd ops, then Adam over all F latents",
            ),
        ]
    return out


def rows() -> list[Row]:
    """Every kernel at 65k and 2^20 latents, then both steps at 65k, 262k and 2^20."""
    return [r for size in ("65k", "1m") for r in _kernel_rows(size)] + [
        r for size in ("65k", "262k", "1m") for r in _step_rows(size)
    ]


def _num(x: float) -> str:
    """Three significant digits, thousands separated, no exponent."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _ms(s: float) -> str:
    return _num(s * 1e3)


def table(found: list[Row]) -> str:
    head = (
        "| kernel | F | operands | GFLOP | GB moved (min) | FLOP/B | floor H100 ms | floor H200 ms | "
        "expected H100 ms | expected H200 ms | memory GB | measured H200 ms |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in found:
        f100, b100 = r.floor(H100)
        f200, _ = r.floor(H200)
        lines.append(
            f"| {r.kernel} | {r.size} | {r.dtype} | {_num(r.flops / 1e9)} | {_num(r.nbytes / GB)} | "
            f"{_num(r.flops / r.nbytes)} | {_ms(f100)} ({b100}) | {_ms(f200)} | {_ms(r.expected(H100))} | "
            f"{_ms(r.expected(H200))} | {_num(r.memory / GB)} | |"
        )
    return "\n".join(lines)


def step_parts_table(found: list[Row]) -> str:
    """Where the bf16 steps' expected time goes, part by part (H200)."""
    lines = ["| step | F | operands | part | GB | expected H200 ms |", "|---|---|---|---|---|---|"]
    for r in found:
        if "step" not in r.kernel or r.dtype != "bf16":
            continue
        for p in r.parts:
            lines.append(
                f"| {r.kernel} | {r.size} | {r.dtype} | {p.what} | {_num(p.nbytes / GB)} | {_ms(p.seconds(H200))} |"
            )
    return "\n".join(lines)


def targets(found: list[Row]) -> str:
    """The issue's targets as predicted ratios; the dense step at 2^20 is predicted although it does not fit."""
    by = {(r.kernel, r.size, r.dtype): r for r in found}
    lines = ["| target | F | predicted H100 | predicted H200 | needed |", "|---|---|---|---|---|"]
    for size, need in (("65k", 3.0), ("262k", None), ("1m", 5.0)):
        sparse, dense = by[("sparse step + LazyAdam", size, "bf16")], by[("dense reference step", size, "bf16")]
        ratio = [dense.expected(c) / sparse.expected(c) for c in (H100, H200)]
        lines.append(
            f"| step speed-up, bf16 | {size} | {ratio[0]:.2f}x | {ratio[1]:.2f}x | "
            f"{'-' if need is None else f'>= {need:g}x'} |"
        )
    for size in ("65k", "1m"):
        enc, gemm = by[("fused encode", size, "bf16")], by[("plain GEMM x @ W_enc", size, "bf16")]
        ratio = [gemm.expected(c) / enc.expected(c) for c in (H100, H200)]
        lines.append(f"| fused encode / plain GEMM | {size} | {ratio[0]:.0%} | {ratio[1]:.0%} | >= 75% |")
    for size in ("65k", "262k", "1m"):
        sparse, dense = by[("sparse step + LazyAdam", size, "bf16")], by[("dense reference step", size, "bf16")]
        lines.append(
            f"| step memory sparse / dense | {size} | {sparse.memory / dense.memory:.2f} "
            f"({sparse.memory / GB:,.3g} / {dense.memory / GB:,.3g} GB) | same | <= 0.5 |"
        )
    sparse = by[("sparse step + LazyAdam", "1m", "bf16")]
    lines.append(f"| 2^20 step on an 80 GB card | 1m | {sparse.memory / GB:,.3g} GB | same | <= 80 GB |")
    for size in ("65k", "1m"):
        dense, sparse = by[("dense reference step", size, "bf16")], by[("sparse step + LazyAdam", size, "bf16")]
        for name, fixes in (
            ("fused LazyAdam", what_if(sparse, optimizer=True)),
            ("fused LazyAdam + encode at 70%", what_if(sparse, optimizer=True, encode=True)),
        ):
            ratio = [dense.expected(c) / sum(p.seconds(c) for p in fixes) for c in (H100, H200)]
            lines.append(
                f"| step speed-up, bf16, with {name} (what-if) | {size} | {ratio[0]:.2f}x | {ratio[1]:.2f}x | |"
            )
    return "\n".join(lines)


FUSED_ADAM_BYTES = 52
"""Bytes per touched weight (both matrices) of a fused LazyAdam kernel, one program per touched latent: read the
gradient, parameter and second moment, write parameter, moment and the bf16 copy (22 per matrix), the W_dec row's
projection and renormalisation on the row held on chip, one more read of the gradients for the clipping norm (8)."""


def what_if(sparse: Row, optimizer: bool = False, encode: bool = False) -> tuple[Part, ...]:
    """The sparse step's parts with the optimizer fused (`FUSED_ADAM_BYTES`, torch-free: at the stream rate) and/or
    the encode at 70% of the bf16 peak (autotuned tiles, no spills): what would close the gaps."""
    parts = []
    for p in sparse.parts:
        if optimizer and p.what.startswith("LazyAdam"):
            p = p._replace(what="fused LazyAdam", nbytes=p.nbytes * FUSED_ADAM_BYTES / (72 * 4), rate=RATES.stream)
        if encode and p.what == "fused encode":
            p = p._replace(rate=0.70)
        parts.append(p)
    return tuple(parts)


def report() -> str:
    found = rows()
    ceilings = "\n".join(
        f"- {c.name}: {c.bf16_tflops:g} TFLOP/s bf16, {c.fp32_tflops:g} fp32, {c.hbm_tbs:g} TB/s ({c.source})"
        for c in (H100, H200)
    )
    sizes = []
    for s in ("65k", "262k", "1m"):
        B, D, F, K, eps = SAE_SIZES[s]
        W = window_pairs(K, F, eps)
        sizes.append(
            f"- {s}: B {B}, D {D}, F {F:,}, K {K}, eps {eps:g}: W {W:.2f} window pairs per row, "
            f"T {touched_latents(B, F, K, W):,.0f} touched latents per batch"
        )
    reasons = dict.fromkeys(
        f"- {r.kernel} ({r.size}): {r.reason}" if "step" in r.kernel else f"- {r.kernel}: {r.reason}" for r in found
    )
    return "\n\n".join(
        [
            "Ceilings:\n" + ceilings,
            "Sizes:\n" + "\n".join(sizes),
            "Kernels and steps:\n" + table(found),
            "Reasons for the expectations:\n" + "\n".join(reasons),
            "Where the steps' time goes:\n" + step_parts_table(found),
            "Targets:\n" + targets(found),
        ]
    )


def main(json_path: str | None = None) -> int:
    print(report())
    if json_path:
        doc = [
            {
                "kernel": r.kernel,
                "size": r.size,
                "dtype": r.dtype,
                "flops": r.flops,
                "bytes": r.nbytes,
                "floor_h100_s": r.floor(H100)[0],
                "bound_h100": r.floor(H100)[1],
                "floor_h200_s": r.floor(H200)[0],
                "expected_h100_s": r.expected(H100),
                "expected_h200_s": r.expected(H200),
                "memory_bytes": r.memory,
                "parts": [p._asdict() for p in r.parts],
                "reason": r.reason,
            }
            for r in rows()
        ]
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {json_path}")
    return 0
