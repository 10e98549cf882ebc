"""What the suite reports: the terminal table, the JSON document and the throughput plot."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

import torch

from bench.roofline import Roofline
from bench.shapes import SAE_SIZES

NOTES = [
    (
        "ms: median of the timed repetitions after warm-up (CUDA events on a GPU, wall clock on the CPU and for "
        "the harvester); IQR: interquartile range"
    ),
    "TFLOP/s, GB/s: the case's own FLOP and byte counts (bench/counts.py) over the median time",
    (
        "%roof: floor / time, floor = max(FLOPs / measured matmul rate of the dtype, bytes / measured copy "
        "bandwidth); bound: which of the two sets the floor"
    ),
    (
        "x ref, x comp: tokens/s over the reference's and torch.compile's (same op and size; a -bf16 case over "
        "reference-bf16's and compile-bf16's); harvest, sweep: over the bare truncated forward"
    ),
    (
        "peak GiB: device memory the case allocated beyond the inputs shared by the cases of its size "
        "(torch.cuda.max_memory_allocated); not measured on the CPU"
    ),
    "a MISMATCH case failed its equivalence check against the PyTorch reference and is not timed",
]


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for name in ("triton", "transformers", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meta(device: torch.device, kernels: str, argv: list[str], quick: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": _cpu_name(),
        "kernels": kernels,
        "quick": quick,
        "argv": argv,
        "versions": versions(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            device_memory_bytes=props.total_memory,
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
        )
    return info


def default_json_path(info: dict[str, Any]) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", f"{info['device'].split(':')[0]} {info['device_name']}".lower()).strip("-")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(__file__).parent / "results" / f"{slug[:60]}-{stamp}.json"


def write_json(path: str | Path, info: dict[str, Any], roofline: Roofline | None, records: list[dict]) -> None:
    """Write atomically (the suite rewrites the file after every case, so a killed run leaves its results)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": info, "roofline": roofline._asdict() if roofline else None, "notes": NOTES, "cases": records}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, path)


def header(info: dict[str, Any], roofline: Roofline | None) -> str:
    v = info["versions"]
    first = (
        f"saekit bench on {info['device_name']} ({info['device']}), {info['date']}; python {v['python']}, "
        f"torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}, CUDA {v['cuda']}; "
        f"kernels: {info['kernels']}"
    )
    lines = [first]
    if roofline:
        rates = ", ".join(f"{k} {r:,.3g} TFLOP/s" for k, r in roofline.matmul_tflops.items())
        lines.append(
            f"roofline: matmul {rates} ({roofline.matmul_n}^3); copy {roofline.copy_gbs:,.1f} GB/s "
            f"({roofline.copy_bytes / 2**30:.2f} GiB moved per copy)"
        )
    return "\n".join(lines)


_COLUMNS = (
    ("case", 34),
    ("status", 10),
    ("ms", 10),
    ("IQR ms", 9),
    ("tokens/s", 12),
    ("TFLOP/s", 9),
    ("GB/s", 9),
    ("%roof", 7),
    ("bound", 8),
    ("x ref", 7),
    ("x comp", 7),
    ("peak GiB", 9),
)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def row(r: dict[str, Any]) -> str:
    first = f"{r['case']:<34}{r['status']:<10}"
    if r["status"] != "ok":
        return first + r["reason"]
    t = r["timing"]
    peak = r.get("peak_memory_bytes")
    cells = [
        _fmt(t["median_s"] * 1e3, ".3f"),
        _fmt(t["iqr_s"] * 1e3, ".3f"),
        _fmt(r["tokens_per_s"], ",.0f"),
        _fmt(r["tflops"], ".3f"),
        _fmt(r["gbs"], ".1f"),
        _fmt(100 * r["roofline_fraction"] if "roofline_fraction" in r else None, ".1f"),
        r.get("bound", "-"),
        _fmt(r.get("speedup_vs_reference"), ".2f"),
        _fmt(r.get("speedup_vs_compile"), ".2f"),
        "n/m" if peak is None else f"{peak / 2**30:.2f}",
    ]
    return first + "".join(f"{c:>{w}}" for c, (_, w) in zip(cells, _COLUMNS[2:]))


def table(records: list[dict[str, Any]]) -> str:
    head = f"{'case':<34}{'status':<10}" + "".join(f"{n:>{w}}" for n, w in _COLUMNS[2:])
    return "\n".join([head, "-" * len(head), *(row(r) for r in records)])


def plot(path: str | Path, records: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """Training-step throughput and roofline fraction vs d_sae (log axes), one line per implementation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_tok, ax_roof = fig.subplots(1, 2)
    styles = {
        "triton": ("o-", "Triton sparse step"),
        "reference": ("s-", "dense reference"),
        "compile": ("^--", "torch.compile(reference)"),
        "triton-bf16": ("o:", "Triton sparse step, bf16"),
        "reference-bf16": ("s:", "dense reference, bf16 autocast"),
        "compile-bf16": ("^:", "torch.compile(reference), bf16 autocast"),
    }
    drawn = 0
    for impl, (style, label) in styles.items():
        pts = sorted(
            (SAE_SIZES[r["size"]].F, r["tokens_per_s"], 100 * r.get("roofline_fraction", float("nan")), r["size"])
            for r in records
            if r["op"] == "step" and r["impl"] == impl and r["status"] == "ok" and r["size"] in SAE_SIZES
        )
        if pts:
            F, tok, roof, sizes = zip(*pts)
            ax_tok.plot(F, tok, style, label=label)
            ax_roof.plot(F, roof, style, label=label)
            for f, y, size in zip(F, tok, sizes):
                shape = SAE_SIZES[size]
                ax_tok.annotate(
                    f"D={shape.D}, B={shape.B}",
                    (f, y),
                    fontsize=7,
                    alpha=0.6,
                    textcoords="offset points",
                    xytext=(4, 4),
                )
            drawn += 1
    for ax, ylabel in ((ax_tok, "tokens / s"), (ax_roof, "% of roofline floor")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("d_sae (latents)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax_tok.legend()
    else:
        ax_tok.text(
            0.5,
            0.5,
            "no timed training-step case\n(Triton is not timed in the interpreter)",
            ha="center",
            va="center",
            transform=ax_tok.transAxes,
        )
    fig.suptitle(f"SAE training step, {info['device_name']} ({info['date'][:10]})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def listing(cases) -> str:
    lines = [f"{'case':<34}{'default in':<20}runs as"]
    for c in cases:
        needs = {
            "triton": "Triton kernels (CUDA; checked in the interpreter on a CPU)",
            "compile": "torch.compile (not run with --quick)",
        }.get(c.needs, "PyTorch")
        operands = "" if c.dtype == "fp32" else f", {c.dtype} {'operands' if c.needs == 'triton' else 'autocast'}"
        lines.append(f"{c.name:<34}{','.join(sorted(c.profiles)) or '-':<20}{needs}{operands}")
    return "\n".join(lines)


def err(message: str) -> None:
    print(message, file=sys.stderr)
