"""`python -m bench`: the CPU quick run end to end, the case registry's errors, and that a wrong implementation is
reported as a mismatch and never timed.

Each `main` call measures the roofline first (~1 s on one core); --repeat-s keeps the timed part short.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench import registry
from bench.__main__ import main
from bench.cases_kernels import decode_case
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


def _without_bias(indices, values, W_dec, b_dec):
    """A plausible kernel bug: the decoder bias is left out (so are its gradients)."""
    return torch.einsum("bk,bkd->bd", values, W_dec[indices]) + 0 * b_dec


@pytest.fixture
def broken_case():
    case = registry.register(decode_case("tiny", "broken", lambda: _without_bias))
    yield case
    registry.unregister(case.name)


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
