"""`python -m bench`: the CPU quick run end to end, the case registry's errors, that a wrong implementation is
reported as a mismatch and never timed, and the 16-bit training-step cases: bf16 on CUDA only, their code path
checked here in float16 under Triton's interpreter by the same tight rule, which a perturbed step fails.

Each `main` call measures the roofline first (~1 s on one core); --repeat-s keeps the timed part short.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sae.sparse_step
from bench import catalog, counts
from bench.__main__ import kernel_mode, main
from bench.cases_kernels import decode_case
from bench.cases_step import step_case
from bench.checks import Comparison
from bench.env import Env
from bench.registry import OP_ORDER
from bench.roofline import Roofline
from bench.timing import Timer
from kernels import reference as R

FAST = ["--quick", "--repeat-s", "0.02"]


def load(path) -> dict:
    doc = json.loads(path.read_text())
    return {**doc, "by_case": {c["case"]: c for c in doc["cases"]}}


def test_quick_run_checks_times_and_writes_json(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "step.png"
    rc = main([*FAST, "--case", "decode/tiny/*", "--case", "harvest/tiny/bare", "--json", str(out), "--plot", str(png)])
    assert rc == 0, capsys.readouterr().out
    doc = load(out)
    assert set(doc) >= {"meta", "roofline", "notes", "cases"}
    meta = doc["meta"]
    assert meta["quick"] and (meta["device"] == "cpu" or torch.cuda.is_available())
    assert {"python", "torch", "triton", "transformers", "cuda"} <= set(meta["versions"])
    assert {"date", "machine", "device_name", "kernels"} <= set(meta)
    assert doc["roofline"]["copy_gbs"] > 0 and doc["roofline"]["matmul_tflops"]["fp32"] > 0

    cases = doc["by_case"]
    assert list(cases) == ["harvest/tiny/bare", "decode/tiny/triton", "decode/tiny/reference", "decode/tiny/compile"]
    ref = cases["decode/tiny/reference"]
    assert ref["status"] == "ok" and ref["check"]["ok"]
    assert ref["timing"]["median_s"] > 0 and ref["timing"]["repeats"] >= 3
    for key in ("tflops", "gbs", "tokens_per_s", "roofline_fraction", "flops", "bytes"):
        assert ref[key] > 0, key
    assert ref["speedup_vs_reference"] == pytest.approx(1.0) and ref["speedup_vs_compile"] is None
    assert "x_hat" in ref["check"]["errors"] and "d W_dec (used rows)" in ref["check"]["errors"]

    kernel = cases["decode/tiny/triton"]
    assert kernel["check"]["ok"]
    if meta["kernels"] == "interpreted":  # checked in the interpreter, never timed
        assert kernel["status"] == "not timed" and kernel["timing"] is None and "tflops" not in kernel
        assert "not timed: interpreter" in kernel["reason"]
    assert cases["decode/tiny/compile"]["status"] == "not run"
    assert "--quick" in cases["decode/tiny/compile"]["reason"]

    harvest = cases["harvest/tiny/bare"]
    assert harvest["status"] == "ok" and harvest["tokens_per_s"] > 0
    assert png.stat().st_size > 0
    table = capsys.readouterr().out
    assert "decode/tiny/reference" in table and "not timed: interpreter" in table


def test_list_and_unknown_case(capsys):
    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    for name in ("step/1m/triton", "encode/16k/reference", "threshold-grad/offline/compile", "harvest/gemma2-2b/bare"):
        assert name in listing
    assert main(["--quick", "--case", "step/2m/*"]) == 2
    err = capsys.readouterr().err
    assert "'step/2m/*' matches no case" in err and "step/16k/triton" in err and "decode/offline/reference" in err


def test_the_registry_imports_no_case_family_and_refuses_unknown_modes():
    """The case families import bench.registry, never the other way (bench/catalog.py assembles them)."""
    code = (
        "import sys, bench.registry; "
        "assert not [m for m in sys.modules if m.startswith('bench.cases_')], sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    assert {c.op for c in catalog.all_cases()} == set(OP_ORDER)
    case = catalog.all_cases()[0]
    for field, value in (("needs", "jax"), ("dtype", "float32"), ("profiles", frozenset({"tpu"}))):
        with pytest.raises(ValueError, match=f"case {case.name}: {field}"):
            dataclasses.replace(case, **{field: value})


def _without_bias(indices, values, W_dec, b_dec):
    """A plausible kernel bug: the decoder bias is left out (so are its gradients)."""
    return torch.einsum("bk,bkd->bd", values, W_dec[indices]) + 0 * b_dec


@pytest.fixture
def broken_case():
    case = catalog.register(decode_case("tiny", "broken", lambda: _without_bias))
    yield case
    catalog.unregister(case.name)


def test_wrong_kernel_is_a_mismatch_and_is_not_timed(tmp_path, broken_case, capsys):
    out = tmp_path / "bench.json"
    rc = main([*FAST, "--case", "decode/tiny/broken", "--case", "decode/tiny/reference", "--json", str(out)])
    assert rc == 1  # a mismatch fails the run
    cases = load(out)["by_case"]
    bad = cases["decode/tiny/broken"]
    assert bad["status"] == "MISMATCH" and not bad["check"]["ok"]
    assert bad["timing"] is None
    for key in ("tflops", "gbs", "tokens_per_s", "roofline_fraction", "peak_memory_bytes"):
        assert key not in bad, key
    assert bad["speedup_vs_reference"] is None
    failed = " ".join(bad["check"]["failures"])
    assert "x_hat" in failed and "d b_dec" in failed
    assert bad["check"]["errors"]["d values"]["error"] <= bad["check"]["errors"]["d values"]["allowed"]
    assert cases["decode/tiny/reference"]["status"] == "ok"  # the suite went on
    assert "MISMATCH" in capsys.readouterr().out


def test_the_oracle_accepts_the_reference_itself():
    """The check's float64 oracle runs on the decoder rows in use only; the full-width reference must agree."""
    g = torch.Generator().manual_seed(0)
    idx, val = torch.randint(0, 50, (7, 3), generator=g), torch.rand(7, 3, generator=g)
    W, b = torch.randn(50, 5, generator=g), torch.randn(5, generator=g)
    rows = torch.unique(idx)
    local = R.decode_sparse(torch.searchsorted(rows, idx), val, W[rows], b)
    torch.testing.assert_close(local, R.decode_sparse(idx, val, W, b))


# -- the 16-bit training-step cases ------------------------------------------------------------------------------

STEP_SIZES = ("offline", "16k", "65k", "262k", "1m")


def test_bf16_step_cases_are_in_the_cuda_profile_only():
    """triton-bf16 and reference-bf16 at every size where the fp32 step runs on CUDA, compile-bf16 where the fp32
    compile does; none in the CPU or --quick selections; speed-ups against the bf16 baselines."""
    cuda = {c.name: c for c in catalog.select(None, "cuda")}
    for size in STEP_SIZES:
        for kind in ("triton", "reference", "compile"):
            assert (f"step/{size}/{kind}-bf16" in cuda) == (f"step/{size}/{kind}" in cuda), (size, kind)
        case = cuda[f"step/{size}/triton-bf16"]
        assert case.dtype == "bf16" and case.needs == "triton"
        assert case.baselines == ("reference-bf16", "compile-bf16")
        assert cuda[f"step/{size}/reference"].baselines == ("reference", "compile")
    assert "step/65k/compile-bf16" in cuda and "step/262k/compile-bf16" not in cuda
    for profile in ("cpu", "quick"):
        assert not [c.name for c in catalog.select(None, profile) if c.dtype != "fp32"]


def test_16bit_operands_count_two_bytes_and_take_the_bf16_rate():
    B, D, F, T = 4096, 2304, 65536, 20000
    flops32, bytes32 = counts.step_dense(B, D, F)
    flops16, bytes16 = counts.step_dense(B, D, F, elt=2)
    # The [B, F], [B, D] and [D, F] operands at 2 bytes, plus the per-step cast of both fp32 masters.
    assert flops16 == flops32 and bytes32 - bytes16 == 8 * B * F + 4 * B * D + 8 * D * F - 12 * D * F
    assert counts.step_sparse(B, D, F, 64, 3, T, elt=2)[1] < counts.step_sparse(B, D, F, 64, 3, T)[1]
    roof = Roofline({"bf16": 800.0, "fp32": 50.0}, 4000.0, 8192, 2**31)
    assert roof.floor_s(8e14, 1.0, "bf16") == roof.floor_s(8e14, 1.0, "fp16") == (1.0, "compute")


@pytest.fixture
def fp16_step():
    """The triton-bf16 code path in float16 (Triton's interpreter cannot read bf16) at the tiny size."""
    case = catalog.register(step_case("tiny", "triton", torch.float16))
    yield case
    catalog.unregister(case.name)


def test_16bit_step_is_checked_in_fp16_and_bf16_is_reported_not_run(tmp_path, fp16_step):
    out = tmp_path / "bench.json"
    rc = main([*FAST, "--case", "step/tiny/triton-fp16", "--case", "step/tiny/*-bf16", "--json", str(out)])
    assert rc == 0
    cases = load(out)["by_case"]
    bf16 = cases["step/tiny/triton-bf16"]
    if load(out)["meta"]["kernels"] == "interpreted":
        assert bf16["status"] == "not run" and bf16["check"] is None
        assert bf16["reason"] == "not run: bf16 needs a GPU (the interpreter cannot read bf16)"
    fp16 = cases["step/tiny/triton-fp16"]
    assert fp16["check"]["ok"], fp16["check"]["failures"]
    assert fp16["status"] in ("not timed", "ok") and "fp16 operands" in fp16["check"]["shape"]
    errors = fp16["check"]["errors"]
    assert errors["touched latents"] == {"error": 0.0, "allowed": 0.0}
    assert {"gradient b_dec", "loss", "W_enc after the step", "W_dec of untouched latents"} <= set(errors)
    # The tight rule: every bound is fp32-sized (2 x torch's fp32 error + 2^-18 x magnitude), never a 16-bit one.
    assert max(e["allowed"] for e in errors.values()) < 2**-11
    # The autocast baseline runs on the CPU as well (CPU autocast), checked against the exact step.
    ref = cases["step/tiny/reference-bf16"]
    assert ref["status"] == "ok" and ref["check"]["ok"] and ref["dtype"] == "bf16"
    assert "eps 0.25, autocast bf16" in ref["check"]["shape"]
    assert ref["baseline_reference"] == "reference-bf16" and ref["speedup_vs_reference"] == pytest.approx(1.0)
    assert all(e["error"] <= e["allowed"] for e in ref["check"]["errors"].values())


def _env() -> Env:
    device = torch.device("cpu")
    kernels, reason = kernel_mode(device)
    if kernels != "interpreted":
        pytest.skip(f"needs Triton's interpreter: {reason}")
    return Env(device, True, kernels, reason, Timer(device))


def _moved_b_dec(monkeypatch) -> None:
    """The step's result perturbed: b_dec moved by 2^-12 of itself after the step."""
    real = sae.sparse_step.sparse_train_step

    def perturbed(model, *args, **kw):
        step = real(model, *args, **kw)
        with torch.no_grad():
            model.b_dec.mul_(1 + 2.0**-12)
        return step

    monkeypatch.setattr(sae.sparse_step, "sparse_train_step", perturbed)


def _unrounded_operands(monkeypatch) -> None:
    """The kernels fed the fp32 x, W_enc, W_dec instead of their fp16 roundings (the products no longer round)."""
    from kernels import sae_pipeline
    from kernels.sae_pipeline import Operands

    def unrounded(x, W_enc, b_enc, W_dec, *args):
        return Operands(x, W_enc, W_dec)

    monkeypatch.setattr(sae_pipeline, "checked_operands", unrounded)


@pytest.mark.parametrize("perturb, first", [(_moved_b_dec, "b_dec after the step"), (_unrounded_operands, None)])
def test_a_perturbed_16bit_step_fails_the_tight_rule(fp16_step, monkeypatch, perturb, first):
    """The same check passes the step, then fails it perturbed by far less than the 16-bit floor the suite used to
    allow (2^-4 for fp16): b_dec moved by 2^-12 after the step, or operands not rounded to fp16 at all (errors about
    half an fp16 unit roundoff, 2^-12, at every output)."""
    env = _env()
    assert fp16_step.check(env).ok
    perturb(monkeypatch)
    check = fp16_step.check(env)
    assert not check.ok
    failed = {f.split(":")[0] for f in check.failures}
    worst = max(check.errors[name]["error"] for name in failed if name in check.errors)
    assert worst < 2.0**-4 and all(check.errors[name]["allowed"] < 2.0**-14 for name in failed)
    if first:  # only what was moved fails
        assert failed == {first} and check.errors[first]["error"] > 2.0**-13
    else:  # every product's rounding is missing: the gradients, the statistics, the parameters
        assert {"gradient W_enc", "gradient W_dec", "loss", "W_dec after the step"} <= failed


def test_the_precision_rule_is_condition_aware():
    """bench.checks ports tests/test_kernels_common.py `assert_matches`: a cancelling output (value 0.058, magnitude
    380: the d b_dec counterexample there) may be off by far more than twice torch's lucky error, within 2^-18 M;
    not beyond it, never NaN; and a magnitude below torch's own error is reported as a wrong model."""
    value, M = torch.tensor([0.058, 1e-3]), torch.tensor([380.0, 1.0])
    ref64, ref32 = value.double(), value.double() + torch.tensor([0.006, 0.0]) * 2.0**-24 * M.double()
    ok, bad = ref64 + 0.048 * 2.0**-24 * M.double(), ref64 + 2.0**-17 * M.double()
    cmp = Comparison("test")
    cmp.rule("plain", ok, ref32, ref64)
    cmp.rule("condition-aware", ok, ref32, ref64, M)
    cmp.rule("too far", bad, ref32, ref64, M)
    cmp.rule("nan", torch.tensor([float("nan"), 1e-3]), ref32, ref64, M)
    cmp.rule("wrong magnitude", ref64, ref32, ref64, M * 1e-6)
    failed = {f.split(":")[0] for f in cmp.result().failures}
    assert failed == {"plain", "too far", "nan", "wrong magnitude"}
    assert cmp.errors["condition-aware"]["error"] <= cmp.errors["condition-aware"]["allowed"]


def test_the_sweep_cases_are_listed_with_their_bare_baseline():
    """The Salmon grid on CUDA only, the tiny sweep in the CPU and --quick selections; each speed-up is over the
    bare forward of its own size, listed under the sweep op (speed-ups are computed within one op and size)."""
    cases = {c.name: c for c in catalog.all_cases()}
    paper = cases["sweep/gemma2-2b/harvester+12saes"]
    assert paper.profiles == {"cuda"} and paper.baselines == ("bare", None)
    assert cases["sweep/gemma2-2b/bare"].profiles == {"cuda"}
    for profile in ("cpu", "quick"):
        chosen = [c.name for c in catalog.select(None, profile) if c.op == "sweep"]
        assert chosen == ["sweep/tiny/bare", "sweep/tiny/harvester+4saes"]


def _sweep_env() -> Env:
    device = torch.device("cpu")
    return Env(device, True, "unavailable", "the sweep's trainers use the reference backend", Timer(device))


def test_the_tiny_sweep_case_checks_every_member_and_catches_one_target_for_all(monkeypatch):
    """The check of `sweep/tiny/harvester+4saes` passes on the real Sweep, and fails when every member's objective
    is built with one target instead of its own."""
    case = {c.name: c for c in catalog.all_cases()}["sweep/tiny/harvester+4saes"]
    env = _sweep_env()
    check = case.check(env)
    assert check.ok, check.failures
    assert check.shape == "4 members, 8 steps of 256 tokens"
    assert len(check.errors) == 4 + 2 * 2  # own sparsity term per member; first L0 and MSE per second member

    import sae.trainer

    real = sae.trainer.Objective
    monkeypatch.setattr(sae.trainer, "Objective", lambda kind, coef, target, tilt: real(kind, coef, 16.0, tilt))
    check = case.check(env)
    assert not check.ok
    failed = " | ".join(check.failures)
    assert "first sparsity term vs its own target's" in failed and "mean threshold of the lowest target" in failed
