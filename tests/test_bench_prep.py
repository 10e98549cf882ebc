"""The GPU preparation that runs on the CPU: `python -m bench --predict` (checked against a hand calculation),
`--static` (ptxas' report parsed from recorded samples, and one kernel compiled end to end), the bf16 encode and
plain GEMM cases (their 16-bit path checked in fp16 under the interpreter, and shown to fail a perturbation), the
first call's summary of targets, and its stage plan (every case it names exists).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench import catalog, counts, first_call, predict, static, summary
from bench.__main__ import main
from bench.cases_gemm import encode_case
from tests.test_bench import _env
from tests.test_kernels_common import INTERPRET  # noqa: F401 (sets the interpreter mode before a test imports kernels)

B, D, K = 4096, 2304, 64


def test_the_encode_prediction_matches_a_hand_calculation():
    """encode/65k/triton-bf16: 2 B D F FLOPs; bf16 x and W_enc read once, fp32 b_enc and theta, 8 bytes per
    active pair (W rounds to 0 window pairs per row), the [B] counters twice and the [F] fire counts."""
    F = 65536
    flops = 2 * 4096 * 2304 * 65536  # 1.237e12
    nbytes = (4096 * 2304 + 2304 * 65536) * 2 + 2 * 65536 * 4 + 4096 * 64 * 8 + (2 * 4096 + 65536) * 4  # 3.238e8
    row = next(r for r in predict.rows() if (r.kernel, r.size, r.dtype) == ("fused encode", "65k", "bf16"))
    assert (row.flops, row.nbytes) == (flops, nbytes) == (1_236_950_581_248, 323_780_608)
    floor, bound = row.floor(predict.H100)
    assert bound == "compute" and floor == pytest.approx(1.2507e-3, rel=1e-4)  # 1.237e12 / 989e12
    assert row.floor(predict.H200)[0] == floor  # the same tensor-core rate; HBM is not the limit
    assert row.expected(predict.H100) == pytest.approx(floor / predict.RATES.encode_bf16)
    # T at 65k: each latent fires in a row with probability ~K / F, so 1 - exp(-B K / F) = 1 - e^-4 of them.
    W = predict.window_pairs(K, F, 0.001)
    assert 0.15 < W < 0.3  # ~ K theta eps / sigma, theta = 3.1
    assert predict.touched_latents(B, F, K, W) == pytest.approx(F * (1 - math.exp(-4)), rel=2e-3)


def test_the_step_predictions_are_their_parts_and_the_bench_counts():
    for r in predict.rows():
        if r.kernel == "sparse step + LazyAdam":
            assert sum(p.flops for p in r.parts) == pytest.approx(r.flops)
            assert sum(p.nbytes for p in r.parts) == pytest.approx(r.nbytes)
        elif r.kernel == "dense reference step":
            assert sum(p.flops for p in r.parts) == r.flops
            assert sum(p.nbytes for p in r.parts) > r.nbytes  # the unfused autograd ops move more than the minimum
    by = {(r.kernel, r.size, r.dtype): r for r in predict.rows()}
    sparse, dense = by[("sparse step + LazyAdam", "1m", "bf16")], by[("dense reference step", "1m", "bf16")]
    assert sparse.memory < 80e9 < dense.memory  # the 2^20 step fits an 80 GB card; the dense one does not
    assert dense.flops == counts.step_dense(B, D, 2**20, 2)[0]


def test_predict_prints_the_tables_and_writes_json(tmp_path, capsys):
    out = tmp_path / "predict.json"
    assert main(["--predict", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert (
        "| fused encode | 65k | bf16 | 1,237 | 0.324 | 3,820 | 1.25 (compute) |" in text
        and "step speed-up, bf16 | 65k" in text
    )
    doc = json.loads(out.read_text())
    assert {r["kernel"] for r in doc} >= {
        "fused encode",
        "plain GEMM x @ W_enc",
        "gather-dot",
        "latent grads",
        "threshold grad",
        "sparse step + LazyAdam",
        "dense reference step",
    }


PTXAS_13 = """ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function '_jumprelu_encode_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _jumprelu_encode_kernel
    1112 bytes stack frame, 1416 bytes spill stores, 1452 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers, 1112 bytes cumulative stack size
ptxas-blackwell info    : Compile time = 3013.383 ms
"""
PTXAS_12 = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'helper' for 'sm_90a'
ptxas info    : Function properties for helper
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, 384 bytes cmem[0]
ptxas info    : Compiling entry function '_gather_dot_kernel' for 'sm_90a'
ptxas info    : Function properties for _gather_dot_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 122 registers, 384 bytes cmem[0]
"""


def test_ptxas_reports_are_parsed():
    """Recorded from Triton 3.9's ptxas-blackwell (the production encode tile) and in the older ptxas' wording,
    with another entry function before the one asked for."""
    assert static.parse_ptxas(PTXAS_13, "_jumprelu_encode_kernel") == static.Resources(255, 1416, 1452, 1112)
    assert static.parse_ptxas(PTXAS_12, "_gather_dot_kernel") == static.Resources(122, 0, 0, 0)
    assert static.parse_ptxas(PTXAS_12, "helper").registers == 12
    with pytest.raises(ValueError, match="no entry function"):
        static.parse_ptxas(PTXAS_12, "_sparse_decode_kernel")


TTIR_W_OFFSETS = """
    %b_w_93 = tt.expand_dims %o_d_66 {axis = 1 : i32} : tensor<64xi32> -> tensor<64x1xi32> loc(#loc127)
    %b_w_94 = tt.splat %F : i32 -> tensor<64x1xi32> loc(#loc127)
    %b_w_95 = arith.muli %b_w_93, %b_w_94 : tensor<64x1xi32> loc(#loc127)
    %b_w_96 = tt.splat %p_w : !tt.ptr<bf16> -> tensor<64x1x!tt.ptr<bf16>> loc(#loc128)
    %b_w_97 = tt.addptr %b_w_96, %b_w_95 : tensor<64x1x!tt.ptr<bf16>>, tensor<64x1xi32> loc(#loc128)
    %b_w_98 = tt.expand_dims %o_f_19 {axis = 0 : i32} : tensor<128xi64> -> tensor<1x128xi64> loc(#loc129)
    %b_w_99 = tt.broadcast %b_w_97 : tensor<64x1x!tt.ptr<bf16>> -> tensor<64x128x!tt.ptr<bf16>> loc(#loc128)
    %b_w_100 = tt.broadcast %b_w_98 : tensor<1x128xi64> -> tensor<64x128xi64> loc(#loc128)
    %b_w_101 = tt.addptr %b_w_99, %b_w_100 : tensor<64x128x!tt.ptr<bf16>>, tensor<64x128xi64> loc(#loc128)
"""


def test_i32_index_products_reaching_a_pointer_are_counted():
    """The encode's W_enc offset o_d * F (recorded TTIR, Triton 3.9): a 32-bit product, wrong once d_in x d_sae
    passes 2^31 (F = 2^20); in 64 bits, or propagated through an extension and a sum, it is (not) counted."""
    assert static.i32_offset_products(TTIR_W_OFFSETS) == 1
    wide = TTIR_W_OFFSETS.replace(
        "tensor<64x1xi32> loc(#loc127)\n    %b_w_96", "tensor<64x1xi64> loc(#loc127)\n    %b_w_96"
    )
    assert static.i32_offset_products(wide) == 0
    summed = """
    %a = arith.muli %i, %j : tensor<64x1xi32>
    %b = arith.extsi %a : tensor<64x1xi32> to tensor<64x1xi64>
    %c = arith.addi %b, %k : tensor<64x1xi64>
    %d = tt.addptr %p, %c : tensor<64x1x!tt.ptr<f32>>, tensor<64x1xi64>
    """
    assert static.i32_offset_products(summed) == 1


def test_static_compiles_a_kernel_for_sm90(tmp_path, capsys):
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton wheel ships no ptxas")
    out = tmp_path / "static.json"
    assert main(["--static", "--case", "threshold-grad/fp32/*", "--json", str(out)]) == 0
    assert "*threshold-grad/fp32/32x128-w4s3" in capsys.readouterr().out
    (config,) = json.loads(out.read_text())["configs"]
    assert config["production"] and 0 < config["registers"] <= 255 and config["i32_offset_products"] == 0
    assert "Compiling entry function '_threshold_grad_kernel'" in config["ptxas"]


def test_static_configs_cover_every_kernel_and_the_encode_tiles():
    names = [c.name for c in static.configs()]
    for kernel in ("encode", "decode", "gather-dot", "latent-grads", "threshold-grad"):
        for ops in ("bf16+fp32", "fp32"):
            assert sum(n.startswith(f"{kernel}/{ops}/") and c.production for n, c in zip(names, static.configs())) == 1
    assert {f"encode/bf16+fp32/{b}x{f}x{d}-w{w}s3" for b, f, d, w in static.ENCODE_TILES} <= set(names)


@pytest.fixture
def fp16_encode():
    """The bf16 encode and GEMM cases in fp16 (Triton's interpreter cannot read bf16) at the tiny size."""
    cases = [catalog.register(encode_case("tiny", kind, torch.float16)) for kind in ("triton", "gemm")]
    yield cases
    for case in cases:
        catalog.unregister(case.name)


def test_the_16bit_encode_and_gemm_cases_check_and_time(tmp_path, fp16_encode):
    out = tmp_path / "bench.json"
    assert main(["--quick", "--repeat-s", "0.02", "--case", "encode/tiny/*-fp16", "--json", str(out)]) == 0
    cases = {c["case"]: c for c in json.loads(out.read_text())["cases"]}
    fused, gemm = cases["encode/tiny/triton-fp16"], cases["encode/tiny/gemm-fp16"]
    assert fused["check"]["ok"] and gemm["check"]["ok"] and gemm["status"] == "ok"
    assert set(fused["check"]["errors"]) == {"active set", "l0", "values", "window pairs", "fire counts"}
    assert fused["check"]["errors"]["values"]["allowed"] < 2.0**-14  # fp32-sized: both sides round the same operands
    assert gemm["baseline_reference"] == "gemm-fp16" and gemm["speedup_vs_reference"] == pytest.approx(1.0)
    if fused["status"] == "ok":  # compiled on a GPU: a fraction of the GEMM's throughput
        assert fused["speedup_vs_reference"] > 0


def test_a_fused_encode_on_unrounded_operands_fails_its_check(fp16_encode, monkeypatch):
    """W_enc passed in fp32 (the kernel then multiplies exact fp32 products): values off by about the fp16
    rounding, far beyond the check's fp32-sized bound."""
    import bench.cases_gemm as cg

    env = _env()
    assert fp16_encode[0].check(env).ok
    monkeypatch.setattr(cg, "_operands", lambda data, rows, low: (data.x[:rows].to(low).contiguous(), data.W_enc))
    check = fp16_encode[0].check(env)
    assert not check.ok and any(f.startswith("values") for f in check.failures)


def _rec(case: str, tps: float | None, peak: float | None = None, status: str = "ok") -> dict:
    return {
        "case": case,
        "status": status,
        "reason": "" if status == "ok" else "out of memory in the timing: x",
        "tokens_per_s": tps,
        "peak_memory_bytes": peak,
        "timing": {"median_s": 4096 / tps} if tps else None,
    }


def test_the_summary_states_each_target_from_the_same_run():
    recs = [
        _rec("step/65k/triton-bf16", 4e5, 5e9),
        _rec("step/65k/reference-bf16", 1e5, 11e9),
        _rec("encode/65k/triton-bf16", 6e6),
        _rec("encode/65k/gemm-bf16", 1e7),
        _rec("step/262k/reference-bf16", 2e4, 45e9),
        _rec("step/1m/triton-bf16", 3e4, 61e9),
        _rec("step/1m/reference-bf16", None, status="skipped"),
        _rec("decode/65k/triton", None, status="MISMATCH"),
    ]
    got = {t.name: t for t in summary.targets(recs)}
    assert got["step speed-up at 65k"].value == pytest.approx(4.0) and got["step speed-up at 65k"].ok
    wide = got["step speed-up at 1m"]  # against 262k's reference, its time scaled by 4: 3e4 / (2e4 / 4) = 6
    assert wide.value == pytest.approx(6.0) and wide.ok and "step/262k/reference-bf16" in wide.detail
    assert "skipped" in wide.detail
    assert got["encode / GEMM at 65k"].value == pytest.approx(0.6) and got["encode / GEMM at 65k"].ok is False
    assert got["step memory ratio at 65k"].value == pytest.approx(5 / 11) and got["step memory ratio at 65k"].ok
    assert got["step memory ratio at 1m"].value is None  # the reference did not run there
    assert got["2^20 step within 80 GB"].ok
    assert got["cases that failed their check or raised"].detail == "decode/65k/triton"


def test_summary_merges_the_stage_files(tmp_path, capsys):
    parts = []
    for i, recs in enumerate([[_rec("step/65k/triton-bf16", 4e5, 5e9)], [_rec("step/65k/reference-bf16", 1e5, 1e10)]]):
        parts.append(tmp_path / f"bench-{i}.json")
        parts[-1].write_text(json.dumps({"meta": {"part": i}, "roofline": None, "notes": [], "cases": recs}))
    merged = tmp_path / "bench.json"
    assert summary.main([*map(str, parts), "--merge", str(merged), "--remove-parts"]) == 0
    assert "step speed-up at 65k" in capsys.readouterr().out
    doc = json.loads(merged.read_text())
    assert [c["case"] for c in doc["cases"]] == ["step/65k/triton-bf16", "step/65k/reference-bf16"]
    assert doc["meta"] == [{"part": 0}, {"part": 1}] and not any(p.exists() for p in parts)


@pytest.mark.parametrize("tiny", [False, True])
def test_every_case_the_first_call_names_exists(tmp_path, tiny):
    plan = first_call.stages(tmp_path, tiny)
    for stage in plan:
        argv = stage.argv
        patterns = [argv[i + 1] for i, a in enumerate(argv) if a == "--case" and "--static" not in argv]
        if patterns:
            assert len(catalog.select(patterns, "cuda")) == len(patterns), stage.name
    if not tiny:  # the stages that always run, with the summary's reserve, fit the 7 minutes
        assert sum(s.budget_s for s in plan if not s.optional) + first_call.SUMMARY_RESERVE_S <= 420
    assert [s.name for s in plan] == ["env", "a", "bc", "d1", "d2", "d3", "f"]
