"""`python -m bench`: time the SAE training step and report tokens/s and TFLOP/s.

The Triton kernels, the harvester and roofline fractions join this suite in their own issues; today it
times the reference (dense PyTorch) step, the baseline every kernel is measured against.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from bench.step import time_reference_step
from harvest.lm import resolve_device

SIZES = {  # name: (batch, d_in, d_sae)
    "offline-default": (1024, 640, 2560),
    "gemma2-2b-16k": (4096, 2304, 16384),
    "gemma2-2b-65k": (4096, 2304, 65536),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), action="append",
                        help="sizes to time (repeatable); default: offline-default, plus the Gemma-2 sizes on CUDA")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions after 2 warm-up steps")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    sizes = args.size or (["offline-default"] + (["gemma2-2b-16k", "gemma2-2b-65k"] if device.type == "cuda" else []))
    torch.set_grad_enabled(True)
    rows = []
    print(f"{'case':<28}{'B':>6}{'D':>6}{'F':>8}{'median ms':>11}{'IQR ms':>9}{'tokens/s':>12}{'TFLOP/s':>9}")
    for name in sizes:
        t = time_reference_step(*SIZES[name], device, args.repeats)
        rows.append({"case": f"reference step {name}", **t._asdict()})
        print(f"{'reference step ' + name:<28}{t.batch:>6}{t.d_in:>6}{t.d_sae:>8}{t.median_s * 1e3:>11.1f}"
              f"{t.spread_s * 1e3:>9.1f}{t.tokens_per_s:>12,.0f}{t.tflops:>9.3f}")
    print("not measured here: Triton kernels, harvester throughput, roofline fractions (see the bench issue)")
    if args.json:
        meta = {"machine": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()}
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
