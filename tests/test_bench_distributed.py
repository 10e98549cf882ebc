"""`torchrun -m bench`: the latent-sharded step checked against the one-process step, then timed, with the bytes
each rank communicates per step measured and counted; and the 8 x H100 expectation's arithmetic."""

from __future__ import annotations

import json

import pytest

from bench.distributed import expected_h100x8, sizes_for
from tests.torchrun import torchrun


def test_torchrun_bench_checks_times_and_counts_the_sharded_step(tmp_path):
    out = tmp_path / "dist.json"
    run = torchrun(3, "-m", "bench", "--quick", "--case", "sharded-step/tiny", "--json", str(out), timeout=300)
    assert run.stdout.count("| sharded-step/tiny | 3 | gloo | ok |") == 1, run.stdout  # rank 0 alone reports
    assert "expected on 8 x H100 SXM" in run.stdout
    (record,) = json.loads(out.read_text())["cases"]
    assert record["status"] == "ok" and record["check"].startswith("largest difference")
    B, D = record["shape"]["B"], record["shape"]["D"]
    assert record["bytes_per_step"] == record["bytes_per_step_counted"] == 4 * (B * D + B + D + 4)
    assert record["tokens_per_s"] > 0 and record["single_tokens_per_s"] > 0


def test_expected_h100x8_figures_follow_from_the_byte_count():
    e = expected_h100x8(1 << 20)
    payload = 4 * (4096 * 2304 + 4096 + 2304 + 4)  # 37,774,352 bytes: x_hat, L0, b_dec's gradient, 4 norms
    assert e.bytes_per_rank == payload
    # ring all-reduce: 2 (8 - 1) / 8 of the payload over 360 GB/s, plus 7 collectives at 25 us
    assert e.comm_ms == pytest.approx((1.75 * payload / 360e9 + 7 * 25e-6) * 1e3)
    assert e.comm_ms == pytest.approx(0.3586, abs=1e-4)
    assert 0 < e.comm_share < 0.01  # at 2^20 latents the step is compute-bound by far


def test_distributed_cases_are_selected_by_glob():
    assert sizes_for(None, "cpu") == ["offline"]
    assert sizes_for(["sharded-step/1*"], "cuda") == ["16k", "1m"]
    with pytest.raises(ValueError, match="matches no distributed case"):
        sizes_for(["step/*"], "cpu")
