"""Runs the selected cases: check each against the reference, then time it; record every figure.

A case whose check fails is reported as MISMATCH and is never timed. Running out of device memory (in the
check or the timing) skips the case with the reason and goes on; any other exception is recorded as an
error with its traceback in the JSON. Triton kernels under the CPU interpreter are checked, never timed, and
their bf16 cases not run (the interpreter cannot read bf16; the tests run the same path in fp16).
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import torch

from bench.env import Env, release
from bench.registry import Case


def is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _failure(rec: dict, stage: str, error: BaseException) -> None:
    first = (str(error).splitlines() or [""])[0][:300]
    if is_oom(error):
        rec["status"], rec["reason"] = "skipped", f"out of memory in the {stage}: {first}"
    else:
        rec["status"], rec["reason"] = "error", f"{stage}: {type(error).__name__}: {first}"
        rec["traceback"] = traceback.format_exc()


def run_case(case: Case, env: Env) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "case": case.name,
        "op": case.op,
        "size": case.size,
        "impl": case.impl,
        "status": None,
        "reason": "",
        "check": None,
        "timing": None,
    }
    if case.needs == "triton" and env.kernels == "unavailable":
        rec["status"], rec["reason"] = "not run", env.kernels_reason
        return rec
    if case.needs == "triton" and case.dtype == "bf16" and env.kernels == "interpreted":
        rec["status"], rec["reason"] = "not run", "not run: bf16 needs a GPU (the interpreter cannot read bf16)"
        return rec
    if case.needs == "compile" and env.quick:
        rec["status"], rec["reason"] = (
            "not run",
            (
                "--quick skips torch.compile: compiling takes tens of seconds "
                "per case on a CPU; the full profile includes it"
            ),
        )
        return rec
    if env.deadline is not None and time.time() > env.deadline:
        rec["status"], rec["reason"] = "not run", "over the --max-minutes budget"
        return rec
    if case.needs == "compile":
        torch._dynamo.reset()  # fresh caches: no recompile limit carried over from another case
    try:
        check = case.check(env)
    except Exception as e:  # noqa: BLE001 (recorded, the suite goes on)
        _failure(rec, "check", e)
        return rec
    finally:
        release(env.device)
    rec["check"] = {
        "ok": check.ok,
        "shape": check.shape,
        "errors": check.errors,
        "failures": check.failures,
        "note": check.note,
    }
    if not check.ok:
        rec["status"], rec["reason"] = "MISMATCH", check.summary()
        return rec
    if case.needs == "triton" and env.kernels == "interpreted":
        rec["status"] = "not timed"
        rec["reason"] = f"not timed: interpreter (checked at {check.shape} in Triton's CPU interpreter)"
        return rec
    if case.needs == "compile":
        torch._dynamo.reset()  # compile for the timed shape alone (the check's row count may differ)
    try:
        rec.update(_time(case, env))
        rec["status"] = "ok"
    except Exception as e:  # noqa: BLE001
        _failure(rec, "timing", e)
    finally:
        release(env.device)
    return rec


def _time(case: Case, env: Env) -> dict[str, Any]:
    cuda = env.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(env.device)
        base = torch.cuda.memory_allocated(env.device)
        torch.cuda.reset_peak_memory_stats(env.device)
    work = case.prepare(env)
    try:
        t = env.timer.time(work.fn, work.min_warmup, work.wall_clock)
    finally:
        if work.cleanup is not None:
            work.cleanup()
    peak = torch.cuda.max_memory_allocated(env.device) - base if cuda else None
    out: dict[str, Any] = {
        "timing": t._asdict(),
        "flops": work.flops,
        "bytes": work.nbytes,
        "tokens": work.tokens,
        "dtype": work.dtype,
        "tokens_per_s": work.tokens / t.median_s,
        "tflops": work.flops / t.median_s / 1e12,
        "gbs": work.nbytes / t.median_s / 1e9,
        "peak_memory_bytes": peak,
        "peak_memory": "max_memory_allocated beyond the shared inputs" if cuda else "not measured on the CPU",
        "note": work.note,
        "timed_with": "wall clock" if work.wall_clock or not cuda else "CUDA events",
        **(work.extra or {}),
    }
    if work.derived is not None:  # figures that need the measured time (a sweep's projected hours)
        out.update(work.derived(out))
    if env.roofline is not None:
        floor, bound = env.roofline.floor_s(work.flops, work.nbytes, work.dtype)
        out.update(floor_s=floor, bound=bound, roofline_fraction=floor / t.median_s)
    return out


def add_speedups(records: list[dict[str, Any]], cases: dict[str, Case]) -> None:
    """speedup_vs_<baseline> = tokens/s of the case over tokens/s of its baseline (same op and size)."""
    timed = {(r["op"], r["size"], r["impl"]): r for r in records if r.get("status") == "ok"}
    for r in records:
        case = cases[r["case"]]
        for slot, base in zip(("speedup_vs_reference", "speedup_vs_compile"), case.baselines):
            other = timed.get((r["op"], r["size"], base)) if base else None
            ok = r.get("status") == "ok" and other is not None
            r[slot] = r["tokens_per_s"] / other["tokens_per_s"] if ok else None
            r[slot.replace("speedup_vs", "baseline")] = base
