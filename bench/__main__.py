"""`python -m bench`: equivalence-checked throughput of the SAE kernels, training step and harvester.

Every case is first checked against the PyTorch reference (outputs and gradients, tolerance from the
dtype); a case that does not match is reported as MISMATCH and never timed. Then it is timed (warm-up, many
repetitions, median and IQR) and reported in tokens/s, TFLOP/s, GB/s, as a fraction of the device's
roofline (matmul rate and copy bandwidth measured at start-up), as a speed-up over the dense reference and
over torch.compile of it, with its peak device memory.

Under torchrun (`torchrun --nproc-per-node N -m bench [--case 'sharded-step/SIZE'] [--json PATH]`): the latent-sharded
training step over the N ranks against the one-process step, tokens/s and bytes communicated per step, and what
8 H100s with NVLink should do (bench/distributed.py).

Without flags: the full profile of the device (CUDA: the offline size and d_sae 16k to 1M at d_in 2304,
batch 4096, the training step also in bf16 (triton-bf16, reference-bf16, compile-bf16), plus the harvester on
a Gemma-2-2B-shaped model; CPU: the offline size and the offline default's harvester, Triton kernels checked
in the interpreter but not timed, their bf16 cases not run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from bench import report
from bench.catalog import all_cases, select
from bench.env import Env, KernelMode
from bench.registry import UnknownCase
from bench.roofline import measure
from bench.runner import add_speedups, run_case
from bench.timing import Timer

_KERNEL_MODULES = (
    "kernels.jumprelu_encode",
    "kernels.sparse_decode",
    "kernels.latent_grads",
    "kernels.threshold_grad",
    "kernels.sae_pipeline",
    "kernels.sae_step",
    "kernels.sparse_grads",
)


def kernel_mode(device: torch.device) -> tuple[KernelMode, str]:
    """How the Triton cases run: ("compiled" | "interpreted" | "unavailable", why unavailable).

    On a CPU device the interpreter is switched on here unless a kernel module is already imported (it is
    read when the kernels are defined).
    """
    if device.type == "cpu" and not any(m in sys.modules for m in _KERNEL_MODULES):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from kernels import launch

    interpreting = launch.interpreting()
    if device.type == "cuda":
        if interpreting:
            return "unavailable", "not run: TRITON_INTERPRET=1 runs kernels on CPU tensors; unset it to time on CUDA"
        return "compiled", ""
    if not interpreting:
        return "unavailable", (
            "not run: the kernels need CUDA, or TRITON_INTERPRET=1 set before they are "
            "imported to check them on the CPU"
        )
    from triton.runtime.interpreter import InterpretedFunction

    from kernels import jumprelu_encode

    if not isinstance(jumprelu_encode._jumprelu_encode_kernel, InterpretedFunction):
        return "unavailable", "not run: kernels/ was imported before TRITON_INTERPRET=1 was set"
    return "interpreted", ""


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0],
        epilog="Cases are named <op>/<size>/<impl>; see --list. JSON: without --json, the full profile "
        "(no --quick, no --case) writes bench/results/<device>-<date>.json and a --quick or --case run "
        "writes none. See bench/gpu_check.sh for the one-call GPU profile.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CPU-sized run for CI (under a minute on 2 cores): the offline size and a tiny random "
        "Gemma-2 harvester; torch.compile cases are listed as not run",
    )
    p.add_argument(
        "--case",
        action="append",
        metavar="GLOB",
        help="run the cases matching this glob, e.g. 'step/16k/*' or '*/offline/reference' "
        "(repeatable); default: the profile's selection",
    )
    p.add_argument("--list", action="store_true", help="list every case with the profiles that include it, and exit")
    p.add_argument(
        "--predict",
        action="store_true",
        help="print the predicted FLOPs, bytes, floors, expected times and memory of each kernel and step "
        "on an H100 / H200 (bench/predict.py; --json writes them), and exit",
    )
    p.add_argument(
        "--static",
        action="store_true",
        help="compile every kernel for sm_90 at its production tiles and print registers, spills and "
        "shared memory (bench/static.py; no GPU needed; --case GLOB selects configs such as "
        "'encode/*'; --json writes them), and exit",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--json", metavar="PATH", help="write every figure here (rewritten after each case)")
    p.add_argument("--plot", metavar="PNG", help="plot training-step throughput vs d_sae here (needs matplotlib)")
    p.add_argument(
        "--replot",
        metavar="JSON",
        help="only redraw --plot from a JSON this suite wrote (e.g. fetched "
        "from a GPU machine without matplotlib), and exit",
    )
    p.add_argument(
        "--repeat-s",
        type=float,
        default=None,
        help="seconds of timed repetitions per case (default 1.0, 0.25 with --quick; at least 3 runs)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's own, all cores; 1 with --quick, whose CI machines "
        "are shared and where busy cores make multi-threaded small ops erratic)",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no new case after this many minutes (the rest are reported as not run)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from sae.distributed.mesh import launched_by_torchrun

    if launched_by_torchrun():  # torchrun --nproc-per-node N -m bench: the latent-sharded step (bench/distributed.py)
        from bench import distributed

        try:
            return distributed.main(args.case, args.json, args.quick)
        except ValueError as e:
            report.err(f"error: {e}")
            return 2
    if args.list:
        print(report.listing(all_cases()))
        return 0
    if args.predict:
        from bench import predict

        return predict.main(args.json)
    if args.static:
        from bench import static

        return static.main(args.json, args.case)
    if args.replot:
        if not args.plot:
            report.err("error: --replot needs --plot PNG")
            return 2
        doc = json.loads(Path(args.replot).read_text())
        report.plot(args.plot, doc["cases"], doc["meta"])
        print(f"wrote {args.plot}")
        return 0
    from harvest.lm import resolve_device

    try:
        device = resolve_device(args.device)
    except Exception as e:  # noqa: BLE001 (a bad --device is a usage error)
        report.err(f"error: {e}")
        return 2
    profile = "quick" if args.quick else device.type
    try:
        cases = select(args.case, profile)
    except UnknownCase as e:
        report.err(f"error: {e}")
        return 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads or (1 if args.quick else threads))
        return _run(args, argv, device, cases)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: list[str] | None, device: torch.device, cases: list) -> int:
    kernels, kernels_reason = kernel_mode(device)
    if any(c.needs == "compile" for c in cases) and not args.quick:
        torch._logging.set_logs(dynamo=logging.ERROR)  # graph breaks at .item() are expected, not news
    start = time.time()
    timer = Timer(device, repeat_s=args.repeat_s or (0.25 if args.quick else 1.0))
    deadline = start + 60 * args.max_minutes if args.max_minutes else None
    env = Env(device, args.quick, kernels, kernels_reason, timer, deadline=deadline)
    info = report.meta(device, kernels, ["python -m bench", *(sys.argv[1:] if argv is None else argv)], args.quick)
    json_path = args.json or (report.default_json_path(info) if not (args.quick or args.case) else None)

    print(report.header(info, None), flush=True)
    env.roofline = measure(device, args.quick)
    print(report.header(info, env.roofline).splitlines()[-1], flush=True)
    records = []
    by_name = {c.name: c for c in cases}
    for i, case in enumerate(cases, 1):
        t0 = time.time()
        rec = run_case(case, env)
        rec["wall_s"] = time.time() - t0
        records.append(rec)
        print(f"[{i}/{len(cases)} {rec['wall_s']:.1f}s] {report.row(rec)}", flush=True)
        if json_path:
            report.write_json(json_path, info, env.roofline, records)
    add_speedups(records, by_name)
    info["wall_s"] = time.time() - start
    print()
    print(report.header(info, env.roofline))
    print(report.table(records))
    print("\n".join(f"  {n}" for n in report.NOTES))
    if json_path:
        report.write_json(json_path, info, env.roofline, records)
        print(f"wrote {json_path}")
    if args.plot:
        try:
            report.plot(args.plot, records, info)
            print(f"wrote {args.plot}")
        except ImportError as e:  # the GPU image has no matplotlib: plot later with --replot
            report.err(f"no plot ({e}); draw it elsewhere: python -m bench --replot {json_path} --plot {args.plot}")
    print(f"wall time {info['wall_s']:.1f} s")
    return 1 if any(r["status"] in ("MISMATCH", "error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
