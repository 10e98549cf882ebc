"""Kernel cases: the fused encode, the threshold STE backward, the sparse decode forward and backward.

Implementations of each op: `triton` (the kernel), `reference` (the PyTorch the dense step runs: the dense
encode, the dense threshold gradient from the saved z; for the decode `kernels.reference.decode_sparse`, the
kernel's twin) and `compile` (torch.compile of that reference). Checks run on the first `check_rows` rows
of the case's synthetic data (the interpreter shape for kernels on the CPU) against float64 oracles taken
from `kernels.reference`; see bench/checks.py for the rule.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from bench import counts
from bench.checks import Check, Comparison
from bench.env import Env, Workload
from bench.registry import Case, profiles_for
from bench.shapes import SAE_SIZES
from bench.synthetic import SAEData, all_pre_activations, capacity_after, slots_to_dense
from kernels import reference as R

IMPLS = ("triton", "reference", "compile")
_COLUMNS = 2**16


def _needs(impl: str) -> str:
    return {"triton": "triton", "compile": "compile"}.get(impl, "torch")


def _inputs(env: Env, size: str, impl: str, check: bool) -> tuple[SAEData, int]:
    """The case's data and how many of its rows to use."""
    shape = env.check_shape(SAE_SIZES[size], impl == "triton") if check else SAE_SIZES[size]
    data = env.sae_data(shape)
    return data, data.check_rows if check else shape.B


def _shape_text(data: SAEData, rows: int) -> str:
    return f"B={rows} D={data.shape.D} F={data.shape.F}"


def pre_activations(x: Tensor, data: SAEData, dtype: torch.dtype) -> Tensor:
    """z = (x - b_dec) W_enc + b_enc [R, F] of the data's SAE in `dtype`, by the reference
    (`bench.synthetic.all_pre_activations`)."""
    return all_pre_activations(x, data.b_dec, data.W_enc, data.b_enc, dtype)


def _rows(shape_B: int, D: int, device: torch.device, seed: int) -> tuple[Tensor, Tensor]:
    """dL/dx_hat [B, D] ~ 2 (x_hat - x) / B in size, and dL/dl0 [B] as the target-L0 term gives it."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape_B, D, generator=g, device=device) * (2.0 / shape_B), torch.full(
        (shape_B,), 1.0 / (8 * shape_B), device=device
    )


# -- encode ----------------------------------------------------------------------------------------------------


class EncodeView(NamedTuple):
    """Any encode's result in one dense form, for comparison."""

    active: Tensor  # [R, F] bool
    values: Tensor  # [R, F] z where active, else 0
    l0: Tensor  # [R] int64
    window: Tensor | None  # [R, F] bool, pairs inside the STE window (the fused encode only)
    fire_counts: Tensor | None  # [F] int64 (the fused encode only)


def _encode_fn(impl: str) -> Callable:
    """The implementation as (x, params, eps) -> its own result (a SparseCode or an Encoded)."""
    if impl == "triton":
        from kernels import jumprelu_encode as enc

        def run(x, p, eps, capacity=None, window_capacity=None):
            return enc.jumprelu_encode(
                x, p["W_enc"], p["b_enc"], p["b_dec"], p["threshold"], eps, capacity, window_capacity
            )

        return run
    encode = torch.compile(R.encode) if impl == "compile" else R.encode

    def run_dense(x, p, eps):
        with torch.no_grad():
            return encode(x, p["W_enc"], p["b_enc"], p["b_dec"], p["threshold"], eps)

    return run_dense


def _encode_view(impl: str, out, F: int) -> EncodeView:
    if impl == "triton":
        active = slots_to_dense(out.indices, out.counts, F)
        return EncodeView(
            active,
            slots_to_dense(out.indices, out.counts, F, out.values),
            out.counts.long(),
            slots_to_dense(out.window, out.window_counts, F),
            out.fire_counts.long(),
        )
    return EncodeView(out.acts > 0, out.acts, out.l0.long(), None, None)  # acts > 0 iff z > theta > 0


def _check_encode(size: str, impl: str) -> Callable[[Env], Check]:
    def check(env: Env) -> Check:
        data, R_ = _inputs(env, size, impl, check=True)
        x, p, eps, F = data.x[:R_].contiguous(), data.params(), data.shape.eps, data.shape.F
        z64 = pre_activations(x, data, torch.float64)
        theta64 = data.threshold.double()
        acts64, l064 = R.jumprelu(z64, theta64, eps), R.step(z64, theta64, eps).sum(-1).long()
        u = (z64 - theta64) / eps
        with torch.no_grad():
            ref32 = R.encode(x, p["W_enc"], p["b_enc"], p["b_dec"], p["threshold"], eps)
        got = _encode_view(impl, _encode_fn(impl)(x, p, eps), F)
        cmp = Comparison(_shape_text(data, R_))
        cmp.exact("active set", got.active, acts64 > 0)
        cmp.exact("l0", got.l0, l064)
        cmp.rule("values", got.values, ref32.acts, acts64)
        if got.window is not None:
            cmp.exact("window pairs", got.window, (u > -0.5) & (u < 0.5))
        if got.fire_counts is not None:
            cmp.exact("fire counts", got.fire_counts, (acts64 > 0).sum(0))
        return cmp.result()

    return check


def _prepare_encode(size: str, impl: str) -> Callable[[Env], Workload]:
    def prepare(env: Env) -> Workload:
        data, _ = _inputs(env, size, impl, check=False)
        B, D, F, _, eps = data.shape
        x, p, run = data.x, data.params(), _encode_fn(impl)
        if impl == "triton":  # slot capacities as the trainer sets them after a first step: no re-run
            first = run(x, p, eps)
            cap = capacity_after(int(first.counts.max()), F)
            wcap = capacity_after(int(first.window_counts.max()), F)
            flops, nbytes = counts.encode_sparse(B, D, F, data.mean_l0, data.mean_window)
            return Workload(lambda: run(x, p, eps, cap, wcap), flops, nbytes, B, note=f"capacity {cap}/{wcap}")
        flops, nbytes = counts.encode_dense(B, D, F)
        return Workload(lambda: run(x, p, eps), flops, nbytes, B, min_warmup=3 if impl == "compile" else 1)

    return prepare


# -- threshold STE backward --------------------------------------------------------------------------------------


def dense_threshold_grad(z: Tensor, g: Tensor, g_l0: Tensor, W_dec: Tensor, threshold: Tensor, eps: float) -> Tensor:
    """d theta [F] from the saved z [B, F], dL/dx_hat g [B, D] and dL/dl0 [B]: what the reference's
    `_JumpReLU.backward` and `_Step.backward` compute, with dL/df = g W_dec^T."""
    window = R._window(z, threshold, eps)
    grad_f = g @ W_dec.t()
    return -(threshold / eps) * (grad_f * window).sum(0) - (g_l0 @ window) / eps


def oracle_threshold_grad(z: Tensor, grad_f: Tensor, g_l0: Tensor, threshold: Tensor, eps: float) -> Tensor:
    """d theta by autograd through `kernels.reference.jumprelu` and `step`, the straight-through oracle."""
    theta = threshold.detach().clone().requires_grad_()
    with torch.enable_grad():
        f, l0 = R.jumprelu(z, theta, eps), R.step(z, theta, eps).sum(-1)
        (d,) = torch.autograd.grad([f, l0], [theta], [grad_f, g_l0])
    return d


def _threshold_fn(impl: str) -> Callable[..., Callable[[], Tensor]]:
    """(x, data, g, g_l0) -> a callable computing d theta; what runs before it (the forward) is not timed."""
    if impl == "triton":
        from kernels import jumprelu_encode as enc
        from kernels import latent_grads as lg
        from kernels import threshold_grad as tg

        def build(x, data, g, g_l0):
            p, eps, F = data.params(), data.shape.eps, data.shape.F
            code = enc.jumprelu_encode(x, p["W_enc"], p["b_enc"], p["b_dec"], p["threshold"], eps)
            return lambda: tg.threshold_grad(
                lg.latent_major(code.window, code.window_counts, F), g, g_l0, data.W_dec, data.threshold, eps
            )

        return build
    grad = torch.compile(dense_threshold_grad) if impl == "compile" else dense_threshold_grad

    def build_dense(x, data, g, g_l0):
        z = pre_activations(x, data, torch.float32)  # saved by the dense forward
        return lambda: grad(z, g, g_l0, data.W_dec, data.threshold, data.shape.eps)

    return build_dense


def _check_threshold(size: str, impl: str) -> Callable[[Env], Check]:
    def check(env: Env) -> Check:
        data, R_ = _inputs(env, size, impl, check=True)
        x, eps = data.x[:R_].contiguous(), data.shape.eps
        g, g_l0 = _rows(data.shape.B, data.shape.D, env.device, seed=1)
        g, g_l0 = g[:R_].contiguous(), g_l0[:R_].contiguous()
        z64 = pre_activations(x, data, torch.float64)
        grad_f64 = torch.cat(
            [g.double() @ data.W_dec[c0 : c0 + _COLUMNS].double().t() for c0 in range(0, data.shape.F, _COLUMNS)], dim=1
        )
        ref64 = oracle_threshold_grad(z64, grad_f64, g_l0.double(), data.threshold.double(), eps)
        del grad_f64
        z32 = pre_activations(x, data, torch.float32)
        ref32 = oracle_threshold_grad(z32, g @ data.W_dec.t(), g_l0, data.threshold, eps)
        got = _threshold_fn(impl)(x, data, g, g_l0)()
        cmp = Comparison(_shape_text(data, R_))
        cmp.rule("d threshold", got, ref32, ref64)
        u = (z64 - data.threshold.double()) / eps
        return cmp.result(note=f"{int(((u > -0.5) & (u < 0.5)).sum())} window pairs")

    return check


def _prepare_threshold(size: str, impl: str) -> Callable[[Env], Workload]:
    def prepare(env: Env) -> Workload:
        data, _ = _inputs(env, size, impl, check=False)
        B, D, F, _, _ = data.shape
        g, g_l0 = _rows(B, D, env.device, seed=1)
        fn = _threshold_fn(impl)(data.x, data, g, g_l0)
        if impl == "triton":
            flops, nbytes = counts.threshold_sparse(B, D, F, data.mean_window)
        else:
            flops, nbytes = counts.threshold_dense(B, D, F)
        return Workload(
            fn,
            flops,
            nbytes,
            B,
            min_warmup=3 if impl == "compile" else 1,
            note=f"{data.mean_window:.2f} window pairs/row",
        )

    return prepare


# -- sparse decode, forward and backward -----------------------------------------------------------------------


def _decode_inputs(data: SAEData, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """indices [B, K] uniform over the latents (repeats allowed), values [B, K] in [0.5, 1.5), upstream [B, D]."""
    B, D, F, K, _ = data.shape
    g = torch.Generator(device=device).manual_seed(2)
    return (
        torch.randint(0, F, (B, K), generator=g, device=device),
        torch.rand(B, K, generator=g, device=device) + 0.5,
        torch.randn(B, D, generator=g, device=device),
    )


def _forward_backward(fn, indices, values, W_dec, b_dec, up) -> tuple[Tensor, ...]:
    """x_hat and the gradients w.r.t. values, W_dec, b_dec of <x_hat, up>."""
    leaves = [t.detach().requires_grad_() for t in (values, W_dec, b_dec)]
    with torch.enable_grad():
        out = fn(indices, *leaves)
        grads = torch.autograd.grad(out, leaves, up)
    return (out.detach(), *grads)


def _decode_fn(impl: str) -> Callable:
    if impl == "triton":
        from kernels.sparse_decode import decode_sparse

        return decode_sparse
    return torch.compile(R.decode_sparse) if impl == "compile" else R.decode_sparse


def _max_outside(t: Tensor, rows: Tensor) -> float:
    """max |t[j]| over the rows j of t [F, D] not in `rows`, in chunks (no [F, D] temporary)."""
    keep = torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
    keep[rows] = False
    worst = 0.0
    for c0 in range(0, t.shape[0], _COLUMNS):
        chunk = t[c0 : c0 + _COLUMNS][keep[c0 : c0 + _COLUMNS]]
        if chunk.numel():
            worst = max(worst, chunk.abs().max().item())
    return worst


def _check_decode(size: str, impl: str, get_fn: Callable[[], Callable]) -> Callable[[Env], Check]:
    def check(env: Env) -> Check:
        data, R_ = _inputs(env, size, impl, check=True)
        indices, values, up = (t[:R_].contiguous() for t in _decode_inputs(data, env.device))
        got = _forward_backward(get_fn(), indices, values, data.W_dec, data.b_dec, up)
        # The oracle on the decoder rows the indices use (the others get a zero gradient): F-independent cost.
        rows = torch.unique(indices)
        local = torch.searchsorted(rows, indices)
        ref = {
            dtype: _forward_backward(
                R.decode_sparse, local, values.to(dtype), data.W_dec[rows].to(dtype), data.b_dec.to(dtype), up.to(dtype)
            )
            for dtype in (torch.float32, torch.float64)
        }
        cmp = Comparison(_shape_text(data, R_))
        for i, name in ((0, "x_hat"), (1, "d values"), (3, "d b_dec")):
            cmp.rule(name, got[i], ref[torch.float32][i], ref[torch.float64][i])
        cmp.rule("d W_dec (used rows)", got[2][rows], ref[torch.float32][2], ref[torch.float64][2])
        scale = ref[torch.float64][2].abs().max().item() or 1.0
        cmp.unchanged("d W_dec (other rows, zero)", _max_outside(got[2], rows) / scale)
        return cmp.result()

    return check


def _prepare_decode(size: str, impl: str, get_fn: Callable[[], Callable]) -> Callable[[Env], Workload]:
    def prepare(env: Env) -> Workload:
        data, _ = _inputs(env, size, impl, check=False)
        B, D, F, K, _ = data.shape
        indices, values, up = _decode_inputs(data, env.device)
        fn = get_fn()
        flops, nbytes = counts.decode(B, D, F, K)
        return Workload(
            lambda: _forward_backward(fn, indices, values, data.W_dec, data.b_dec, up),
            flops,
            nbytes,
            B,
            min_warmup=3 if impl == "compile" else 1,
        )

    return prepare


def decode_case(
    size: str, impl: str, get_fn: Callable[[], Callable], needs: str = "torch", profiles: frozenset[str] = frozenset()
) -> Case:
    """A decode case for any function with the signature of `kernels.reference.decode_sparse`
    (indices, values, W_dec, b_dec) -> x_hat, differentiable w.r.t. the last three; `get_fn` is called when
    the case runs (kernel modules must not be imported before the interpreter mode is set)."""
    return Case(
        "decode", size, impl, _check_decode(size, impl, get_fn), _prepare_decode(size, impl, get_fn), profiles, needs
    )


def cases() -> list[Case]:
    out = []
    for size in SAE_SIZES:
        for impl in IMPLS:
            profiles, needs = profiles_for(size, impl), _needs(impl)
            out += [
                Case("encode", size, impl, _check_encode(size, impl), _prepare_encode(size, impl), profiles, needs),
                Case(
                    "threshold-grad",
                    size,
                    impl,
                    _check_threshold(size, impl),
                    _prepare_threshold(size, impl),
                    profiles,
                    needs,
                ),
                decode_case(size, impl, functools.partial(_decode_fn, impl), needs, profiles),
            ]
    return out
