"""`python -m bench --static`: every kernel compiled for an H100 (sm_90) at its production tiles, with the compiler's
resource report: registers per thread, spill stores and loads, stack frame, shared memory. No GPU is needed.

Triton's wheel ships ptxas; `triton.compile` with an explicit target builds the cubin on any machine, and Triton's
own ptxas run (`-v`) prints the report, which `knobs.nvidia.dump_ptxas_log` lets us read: the figures are those of
the cubin that runs (same ptxas, same flags). Where that knob is missing (older Triton), ptxas is run again on the
PTX with `-v`. Shared memory is Triton's own request (`metadata.shared`, dynamic), not in ptxas' report.

A kernel that spills (stack frame, spill stores) keeps part of its live state in local memory, an L1/L2/HBM round
trip per access: read this before timing (STYLE.md habit 15). The report also counts index products computed in
32 bits that reach a pointer (`i32 offset products`, read off the TTIR): each is an overflow where its factors
can exceed 2^31 (e.g. d_in x d_sae at 2^20 latents), unless its operands are known to be small.

Configs are named `<kernel>/<operands>/<tile>-w<warps>s<stages>` (`--case GLOB` selects among them); operands
`bf16+fp32` is the training step with compute_dtype = bf16 beside fp32 parameters (the performance targets'
path), `fp32` the all-fp32 one. The encode is also built at the tiles GPU_NOTES.md lists, to choose from.
Compiling runs in a subprocess with TRITON_INTERPRET unset and a fresh Triton cache (so ptxas runs), in parallel.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
NUM_STAGES = 3  # every row of kernels/tiles.py (Triton's default on CUDA)


class Config(NamedTuple):
    """One kernel build: which kernel, its pointer types, constexprs (tl dtypes by name), warps and stages."""

    name: str
    module: str
    kernel: str
    pointers: dict[str, str]  # by parameter name; the others default to *fp32 (p_*), i32 or fp32 (eps)
    constexprs: dict[str, Any]  # "tl.bfloat16" / "tl.float32" strings stand for those dtypes
    num_warps: int = 4
    production: bool = True  # the tile the library launches (kernels/tiles.py)


class Resources(NamedTuple):
    registers: int
    spill_stores: int  # bytes per thread
    spill_loads: int
    stack_frame: int


ENCODE_TILES = [
    (64, 128, 64, 4),
    (64, 64, 64, 4),
    (128, 128, 64, 4),
    (64, 128, 64, 8),
    (128, 128, 64, 8),
    (128, 256, 64, 8),
]
"""(BLOCK_B, BLOCK_F, BLOCK_D, num_warps) of the encode to choose from; kernels/tiles.py holds the one launched."""


def configs() -> list[Config]:
    """The production builds of every kernel in both operand settings, and the encode's candidate tiles."""
    from kernels import tiles

    counters = {k: "*i32" for k in ("p_idx", "p_cnt", "p_win", "p_wcnt", "p_fire")}
    pairs = {k: "*i64" for k in ("p_lat", "p_orow", "p_start", "p_rows", "p_slots")}
    out = []
    for ops, x, dot, precision in (
        ("bf16+fp32", "*bf16", "tl.bfloat16", "tf32"),
        ("fp32", "*fp32", "tl.float32", "ieee"),
    ):
        chosen = tiles.ENCODE["16-bit" if ops == "bf16+fp32" else "fp32"]
        candidates = ENCODE_TILES if ops == "bf16+fp32" else [(*chosen.blocks, chosen.num_warps)]
        for bb, bf, bd, warps in candidates:
            out.append(
                Config(
                    f"encode/{ops}/{bb}x{bf}x{bd}-w{warps}s{NUM_STAGES}",
                    "kernels.jumprelu_encode",
                    "_jumprelu_encode_kernel",
                    {"p_x": x, "p_w": x, **counters},
                    {
                        "OP_DTYPE": dot,
                        "DOT_DTYPE": dot,
                        "PRECISION": precision,
                        "BLOCK_B": bb,
                        "BLOCK_F": bf,
                        "BLOCK_D": bd,
                    },
                    warps,
                    production=((bb, bf, bd), warps) == (chosen.blocks, chosen.num_warps),
                )
            )
        rows = {"p_idx": "*i64", "p_cnt": "*i32", "p_w": x}
        tile = f"32x128-w4s{NUM_STAGES}"
        out += [
            Config(
                f"decode/{ops}/{tile}",
                "kernels.sparse_decode",
                "_sparse_decode_kernel",
                rows,
                {"HAS_BIAS": True, "BLOCK_K": 32, "BLOCK_D": 128},
            ),
            Config(
                f"gather-dot/{ops}/{tile}",
                "kernels.sparse_decode",
                "_gather_dot_kernel",
                rows,
                {"BLOCK_K": 32, "BLOCK_D": 128},
            ),
            Config(
                f"latent-grads/{ops}/{tile}",
                "kernels.latent_grads",
                "_latent_grads_kernel",
                {**pairs, "p_x": x},
                {"HAS_ENC": True, "XC_DTYPE": dot, "BLOCK_P": 32, "BLOCK_D": 128},
            ),
            Config(
                f"threshold-grad/{ops}/{tile}",
                "kernels.threshold_grad",
                "_threshold_grad_kernel",
                {**pairs, "p_wdec": x},
                {"BLOCK_P": 32, "BLOCK_D": 128},
            ),
        ]
    return out


_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)'")
_PROPS = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads"
)
_USED = re.compile(r"Used (?P<regs>\d+) registers")


def parse_ptxas(log: str, kernel: str) -> Resources:
    """Registers, spills and stack frame of entry function `kernel` from ptxas' `-v` report.

    The report has, per function, "Compiling entry function 'name'", then "Function properties for name" with
    "<n> bytes stack frame, <n> bytes spill stores, <n> bytes spill loads", then "Used <n> registers, ...".
    Raises ValueError when the entry is missing.
    """
    start = next((m.end() for m in _ENTRY.finditer(log) if m.group("name") == kernel), None)
    if start is None:
        raise ValueError(f"no entry function {kernel!r} in the ptxas report:\n{log}")
    block = log[start:]
    following = _ENTRY.search(block)
    block = block[: following.start()] if following else block
    props, used = _PROPS.search(block), _USED.search(block)
    if props is None or used is None:
        raise ValueError(f"incomplete ptxas report for {kernel!r}:\n{block}")
    return Resources(int(used["regs"]), int(props["stores"]), int(props["loads"]), int(props["stack"]))


_SSA = re.compile(r"^\s*(%[\w.#]+)(?::\d+)? = ([\w.]+) (.*)$")
_PROPAGATE = ("arith.extsi", "arith.addi", "arith.muli", "tt.broadcast", "tt.expand_dims", "tt.splat")


def i32_offset_products(ttir: str) -> int:
    """How many `tt.addptr` take an offset derived from a 32-bit `arith.muli` on tensors (a row index times a
    stride, say): each wraps around past 2^31. Propagated through sign extensions, additions, products and
    broadcasts, so `(o_d * F) + o_f` counts even after o_f made the sum 64-bit."""
    tainted: set[str] = set()
    found = 0
    for line in ttir.splitlines():
        m = _SSA.match(line)
        if not m:
            continue
        result, op, rest = m.groups()
        operands = set(re.findall(r"%[\w.#]+", rest.split(" : ")[0]))
        i32_product = op == "arith.muli" and re.search(r":\s*tensor<[\dx]+xi32>", rest)
        if i32_product or (op in _PROPAGATE and operands & tainted):
            tainted.add(result)
        elif op == "tt.addptr" and operands & tainted:
            found += 1
    return found


def _compile(config: Config) -> dict[str, Any]:
    """Build one config for sm_90 (in a worker process) and read its resource report."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(config.module), config.kernel)
    constexprs = {
        k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v for k, v in config.constexprs.items()
    }
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.startswith("p_"):
            sig[name] = config.pointers.get(name, "*fp32")
        else:
            sig[name] = "fp32" if name == "eps" else "i32"
    knobs = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if knobs is not None and hasattr(knobs, "dump_ptxas_log"):
        knobs.dump_ptxas_log = True
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        kernel = triton.compile(
            ASTSource(fn, sig, constexprs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": config.num_warps, "num_stages": NUM_STAGES},
        )
    log, source = captured.getvalue(), "triton's ptxas run"
    if "Compiling entry function" not in log:
        log, source = _rerun_ptxas(kernel.asm["ptx"]), "ptxas -v on triton's PTX"
    res = parse_ptxas(log, fn.__name__)
    return {
        "name": config.name,
        "production": config.production,
        "num_warps": config.num_warps,
        "num_stages": NUM_STAGES,
        **res._asdict(),
        "shared_bytes": kernel.metadata.shared,
        "i32_offset_products": i32_offset_products(kernel.asm["ttir"]),
        "source": source,
        "ptxas": log.strip(),
    }


def _rerun_ptxas(ptx: str) -> str:
    """ptxas -v on the PTX with the wheel's own ptxas (newest first), for Tritons that cannot echo their log."""
    import triton

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        errors = []
        for tool in ("ptxas-blackwell", "ptxas"):
            if (bindir / tool).exists():
                run = subprocess.run(
                    [
                        str(bindir / tool),
                        "-lineinfo",
                        "-v",
                        "--gpu-name=sm_90a",
                        str(src),
                        "-o",
                        str(Path(tmp) / "k.o"),
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if run.returncode == 0:
                    return run.stdout + run.stderr
                errors.append(f"{tool}: {run.stderr.strip()[-500:]}")
    raise RuntimeError("no ptxas in Triton's wheel could assemble the PTX: " + "; ".join(errors))


def compile_all(patterns: list[str] | None = None, jobs: int | None = None) -> list[dict[str, Any]]:
    """In this process (TRITON_INTERPRET must be unset before `kernels` is imported): the selected configs,
    built `jobs` at a time (default: the CPU count, at most 8)."""
    chosen = [c for c in configs() if not patterns or any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    if not chosen:
        raise ValueError(f"no static config matches {patterns}; names: {[c.name for c in configs()]}")
    jobs = jobs or min(8, os.cpu_count() or 1)
    if jobs == 1 or len(chosen) == 1:
        return [_compile(c) for c in chosen]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile, chosen))


def table(results: list[dict[str, Any]], triton_version: str) -> str:
    lines = [
        (
            f"Kernels compiled for sm_90 (Triton {triton_version}); registers per thread, spill bytes per thread, "
            "shared memory per program; * = the tile the library launches"
        ),
        f"{'config':42} {'regs':>5} {'spill st':>9} {'spill ld':>9} {'stack':>6} {'shared':>8} {'i32 offs':>8}",
    ]
    for r in results:
        mark = "*" if r["production"] else " "
        lines.append(
            f"{mark}{r['name']:41} {r['registers']:>5} {r['spill_stores']:>9} {r['spill_loads']:>9} "
            f"{r['stack_frame']:>6} {r['shared_bytes']:>8} {r['i32_offset_products']:>8}"
        )
    lines.append("i32 offs: pointer offsets derived from a 32-bit index product (each wraps past 2^31 elements)")
    return "\n".join(lines)


def main(json_path: str | None = None, patterns: list[str] | None = None) -> int:
    """Compile in a subprocess (clean TRITON_INTERPRET, fresh cache), print the table, write JSON if asked."""
    import triton

    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=cache, PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
        run = subprocess.run(
            [sys.executable, "-m", "bench.static", *(patterns or [])],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
    if run.returncode != 0:
        print(run.stdout + run.stderr, file=sys.stderr)
        return 1
    results = json.loads(run.stdout)
    print(table(results, triton.__version__))
    if json_path:
        Path(json_path).write_text(
            json.dumps({"triton": triton.__version__, "target": "cuda sm_90", "configs": results}, indent=2)
        )
        print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":  # the worker: python -m bench.static [GLOB ...] prints the results as JSON
    print(json.dumps(compile_all(sys.argv[1:] or None)))
