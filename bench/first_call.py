"""Issue 12's first GPU call, stage by stage, the most important first (bench/gpu_first_call.sh runs it):

    env   env.txt: commit, GPU (read-only nvidia-smi queries, device properties), versions, and an import of
          every module the later stages use (a missing one shows here, not minutes later)
    a     compiled fp32 and bf16 equivalence of every kernel with kernels/reference.py: tests/gpu (the H100 tiles,
          bf16 against the exact result), the kernel tests (outputs and every gradient, odd shapes on both sides of
          each tile, NaN-poisoned outputs), the sparse step against the dense one, the Hypothesis properties (each
          bounded by its own @settings, 10 to 25 examples, derandomised by CI=true); pytest.xml
    bc    bench: step/65k/{triton,reference}{,-bf16} (the step against the dense reference), then
          encode/65k/{triton-bf16,gemm-bf16} (the fused encode against a plain bf16 GEMM of its shape), then the
          fp32 kernel cases at 65k (encode, threshold-grad, decode, each against its reference)
    d1    bench: step/1m/triton-bf16, step/1m/triton, encode/1m/{triton-bf16,gemm-bf16} (speed and peak memory)
    d2    bench: step/262k/* without compile: the widest size where the dense reference step fits
    d3    (if time is left) bench: step/1m/reference-bf16, which is predicted not to fit (docs/performance.md)
    e     python -m bench.summary: every case's time, peak memory (each bench case records its
          max_memory_allocated beyond the shared inputs) and the targets; the parts merged into bench.json
    f     (if time is left) python -m bench --static with this machine's Triton: registers, spills, shared memory

Each stage is a child process in its own process group, stopped at its own bound (SIGINT, so pytest and the bench
report what they finished, then SIGKILL); a stage starts only if the total budget leaves room for it and for the
summary. Every bench stage writes its JSON after each case, so a cut stage keeps its finished cases.
Everything lands in --out: env.txt, pytest.xml, bench.json (or the stage parts bench-*.json if the summary did
not run), static.json, and the shell's first-call.log: at most 8 files, as a device call returns.

--tiny rehearses the same plan on a CPU in Triton's interpreter: tiny and offline sizes, a few kernel tests.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from bench import summary

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 15  # after SIGINT, before SIGKILL
SUMMARY_RESERVE_S = 15
KERNEL_TESTS = (
    "tests/gpu",
    "tests/test_kernels.py",
    "tests/test_kernels_mixed.py",
    "tests/test_sparse_step.py",
    "tests/test_kernels_properties.py",
    "tests/test_sparse_adam.py",
)
TINY_TESTS = ("tests/gpu", "tests/test_kernels.py", "-k", "sparse_decode_matches or public_function")
MODULES = (
    "torch",
    "triton",
    "numpy",
    "pytest",
    "hypothesis",
    "safetensors",
    "tqdm",
    "transformers",
    "bench.__main__",
    "bench.cases_step",
    "bench.cases_kernels",
    "bench.cases_gemm",
    "bench.cases_harvest",
    "bench.cases_sweep",
    "bench.static",
    "bench.summary",
    "kernels.sae_step",
    "kernels.sparse_grads",
    "sae.sparse_step",
    "sae.trainer",
)
"""Imported by the env stage (kernel modules after TRITON_INTERPRET is settled): each must be on the machine."""


class Sizes(NamedTuple):
    mid: str  # the 65k comparison
    wide: str  # the 2^20 step
    ref: str  # the widest size where the dense reference fits


FULL, TINY = Sizes("65k", "1m", "262k"), Sizes("tiny", "offline", "offline")


class Stage(NamedTuple):
    name: str
    budget_s: int
    argv: list[str]
    optional: bool = False  # run only if time is left after the summary's turn
    bench: bool = False  # a `python -m bench` run: told to start no case in the last 25% of its bound


def _bench(name: str, budget_s: int, out: Path, repeat_s: float, cases: list[str], optional: bool = False) -> Stage:
    """A `python -m bench` run of `cases` into bench-<name>.json."""
    argv = [sys.executable, "-m", "bench", "--json", str(out / f"bench-{name}.json"), "--repeat-s", str(repeat_s)]
    for case in cases:
        argv += ["--case", case]
    return Stage(name, budget_s, argv, optional, bench=True)


def stages(out: Path, tiny: bool = False, workers: int | None = None) -> list[Stage]:
    """The plan. Budgets (s) fit 7 minutes on an H100 with the summary: 20 + 140 + 110 + 70 + 55 + 15 = 410."""
    s = TINY if tiny else FULL
    repeat = 0.02 if tiny else 0.5
    tests = list(TINY_TESTS if tiny else KERNEL_TESTS)
    if workers and workers > 1:
        tests = ["-n", str(workers), "--dist", "loadfile", *tests]
    scale = 4 if tiny else 1  # the interpreter and a shared 2-core CPU are slow: the rehearsal gets more time
    bounds = {"env": 20, "a": 140, "bc": 110, "d1": 70, "d2": 55, "d3": 40, "f": 60}
    budgets = {k: v * scale for k, v in bounds.items()}
    step = [f"step/{s.mid}/{impl}" for impl in ("triton-bf16", "reference-bf16", "triton", "reference")]
    kernels = [
        f"{op}/{s.mid}/{impl}" for op in ("encode", "threshold-grad", "decode") for impl in ("triton", "reference")
    ]
    return [
        Stage("env", budgets["env"], [sys.executable, "-m", "bench.first_call", "--env", str(out / "env.txt")]),
        Stage(
            "a",
            budgets["a"],
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-rfEs",
                "--durations=15",
                f"--junitxml={out / 'pytest.xml'}",
                *tests,
            ],
        ),
        _bench(
            "bc",
            budgets["bc"],
            out,
            repeat,
            [*step, f"encode/{s.mid}/triton-bf16", f"encode/{s.mid}/gemm-bf16", *kernels],
        ),
        _bench(
            "d1",
            budgets["d1"],
            out,
            repeat,
            [
                f"step/{s.wide}/triton-bf16",
                f"step/{s.wide}/triton",
                f"encode/{s.wide}/triton-bf16",
                f"encode/{s.wide}/gemm-bf16",
            ],
        ),
        _bench(
            "d2",
            budgets["d2"],
            out,
            repeat,
            [f"step/{s.ref}/{i}" for i in ("triton-bf16", "reference-bf16", "triton", "reference")],
        ),
        _bench("d3", budgets["d3"], out, repeat, [f"step/{s.wide}/reference-bf16"], optional=True),
        Stage(
            "f",
            budgets["f"],
            [sys.executable, "-m", "bench", "--static", "--json", str(out / "static.json")],
            optional=True,
        ),
    ]


def run_stage(stage: Stage, budget_s: float) -> int:
    """Run one stage in its own process group; SIGINT at its bound, SIGKILL GRACE_S later. Returns its exit code
    (124 when cut at the bound)."""
    t0 = time.time()
    argv = stage.argv + (["--max-minutes", f"{0.75 * budget_s / 60:.2f}"] if stage.bench else [])
    print(f"\n== stage {stage.name}: up to {budget_s:.0f} s: {' '.join(argv)}", flush=True)
    proc = subprocess.Popen(argv, cwd=ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # the group may have ended meanwhile
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        rc = 124
    note = " (cut at its bound)" if rc == 124 else ""
    print(f"== stage {stage.name}: exit {rc} after {time.time() - t0:.0f} s{note}", flush=True)
    return rc


def summarise(out: Path) -> int:
    parts = sorted(out.glob("bench-*.json"), key=lambda p: p.stat().st_mtime)
    paths = ([out / "bench.json"] if (out / "bench.json").exists() else []) + parts
    print("\n== stage e: summary", flush=True)
    if not paths:
        print("no bench stage wrote a JSON")
        return 1
    return summary.main([*map(str, paths), "--merge", str(out / "bench.json"), "--remove-parts"])


def write_env(path: Path) -> int:
    """env.txt: what ran where. Run as its own stage (a child process): CUDA is initialised there, not here."""
    lines = [
        f"date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
        f"commit: {os.environ.get('COMMIT') or _git('rev-parse', 'HEAD')}",
        f"working tree changes: {_git('status', '--porcelain') or 'none (or no .git here)'}",
        f"python: {sys.version.split()[0]} at {sys.executable}",
        f"cpus: {os.cpu_count()}",
    ]
    query = (
        "name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,"
        "temperature.gpu,persistence_mode,compute_mode"
    )
    lines.append(_cmd(["nvidia-smi", f"--query-gpu={query}", "--format=csv"]))
    failed = []
    for name in MODULES:
        try:
            module = __import__(name, fromlist=["_"])
            lines.append(f"import {name}: ok {getattr(module, '__version__', '')}".rstrip())
        except Exception as e:  # noqa: BLE001 (every failure is reported, the call goes on)
            failed.append(name)
            lines.append(f"import {name}: FAILED {type(e).__name__}: {e}")
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            lines.append(
                f"device: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
                f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB; "
                f"torch {torch.__version__}, CUDA {torch.version.cuda}"
            )
        else:
            lines.append("device: no CUDA device (a CPU rehearsal)")
    except Exception as e:  # noqa: BLE001
        lines.append(f"device: FAILED {type(e).__name__}: {e}")
    text = "\n".join(lines)
    path.write_text(text + "\n")
    print(text)
    return 1 if failed else 0


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git here: pass COMMIT=<hash>)"


def _cmd(argv: list[str]) -> str:
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        return (run.stdout + run.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{argv[0]}: {e}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.first_call", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results" / "first-call"))
    p.add_argument("--tiny", action="store_true", help="rehearse on a CPU: interpreter, tiny sizes, a few tests")
    p.add_argument(
        "--total-s", type=float, default=None, help="the whole call's budget (default 420; 1800 with --tiny)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="pytest-xdist workers for stage a (default 4 where xdist is installed, else none)",
    )
    p.add_argument("--only", action="append", metavar="STAGE", help="run these stages only (env a bc d1 d2 d3 e f)")
    p.add_argument("--env", metavar="PATH", help=argparse.SUPPRESS)  # the env stage's child
    args = p.parse_args(argv)
    if args.env:
        return write_env(Path(args.env))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    workers = args.workers if args.workers is not None else (4 if importlib.util.find_spec("xdist") else 0)
    total = args.total_s or (1800 if args.tiny else 420)
    deadline = time.time() + total
    plan = [s for s in stages(out, args.tiny, workers) if not args.only or s.name in args.only]
    codes: dict[str, int | str] = {}
    summarised = False
    for stage in plan:
        if stage.optional and not summarised and (not args.only or "e" in args.only):
            codes["e"] = summarise(out)
            summarised = True
        left = deadline - time.time() - (0 if summarised else SUMMARY_RESERVE_S)
        budget = min(stage.budget_s, left)
        if budget < 10:
            print(f"\n== stage {stage.name}: not run ({left:.0f} s left of the {total:.0f} s budget)", flush=True)
            codes[stage.name] = "not run"
            continue
        codes[stage.name] = run_stage(stage, budget)
        if stage.name == "a" and codes["a"] == 4 and "-n" in stage.argv:  # pytest's usage error: xdist did not load
            i = stage.argv.index("-n")
            plain = stage._replace(argv=stage.argv[:i] + stage.argv[i + 4 :])
            codes["a"] = run_stage(plain, min(plain.budget_s, deadline - time.time() - SUMMARY_RESERVE_S))
    if (not args.only or "e" in args.only) and (not summarised or "d3" in codes and codes["d3"] != "not run"):
        codes["e"] = summarise(out)
    print(f"\n== first call done in {total - (deadline - time.time()):.0f} s; stage exit codes: {codes}")
    return 0 if all(c in (0, "not run") for c in codes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
