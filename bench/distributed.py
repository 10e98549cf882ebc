"""`torchrun --nproc-per-node N -m bench`: the latent-sharded training step against the one-process step.

Under torchrun (`python -m bench` sees torchrun's environment) every rank joins the mesh and, per SAE size:

1. checks the sharded dense step against the one-process dense step on the same global batch (a small shape,
   three steps: figures and every gathered parameter within the fp32 rule of tests/test_sharded_step.py); a
   size whose check fails is reported as MISMATCH and not timed;
2. times the sharded step at the size's full shape (B tokens, d_in D, F latents split over the ranks), all ranks
   in lockstep (a barrier before each step, the slowest rank's time), and the one-process step of the same
   global shape on rank 0 alone while the others wait;
3. reports tokens/s of both, the speed-up, and the bytes each rank hands to collectives per step: measured by the
   mesh's counter and counted, `sae.distributed.sharded.step_bytes` = 4 (B D + B + D + 4); they must agree.

`expected_table` turns the byte and FLOP counts into what 8 H100 SXM with NVLink should do (printed with every
distributed report): the collectives as NCCL ring all-reduces at a stated bus bandwidth and latency, the compute
as the dense step's parts (bench/predict.py) on F / 8 latents per GPU.
"""

from __future__ import annotations

import fnmatch
import json
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from bench.predict import FP32, H100, dense_step_parts
from bench.shapes import SAE_SIZES, Shape
from sae.config import OptimConfig
from sae.dense_step import DenseStep
from sae.distributed.layout import latent_slice
from sae.distributed.mesh import Mesh
from sae.distributed.sharded import gather_sae, step_bytes
from sae.model import JumpReLUSAE
from sae.objectives import Objective

CHECK_SHAPE = Shape(48, 24, 50, 6, 0.05)  # 50 latents: unequal shards over 3 (17, 17, 16) and 4 ranks
NVLINK_BUS_GBS = 360.0  # NCCL all-reduce bus bandwidth on 8 H100 SXM (NVLink 4, 450 GB/s per direction per GPU):
# nccl-tests' busBW reaches ~80% of the link at large messages
ALLREDUCE_LATENCY_US = 25.0  # a small NCCL all-reduce across 8 GPUs of one node (ring/tree, launch included)
COLLECTIVES_PER_STEP = 7  # x_hat, L0 per row, b_dec's encoder gradient, the 4 squared gradient norms (one each)
OBJECTIVE = Objective("target_l0", 1.0, 8.0)


class Timing(NamedTuple):
    seconds: float  # median step
    bytes_per_step: int  # measured payload this rank sent to collectives


def _model(shape: Shape, sl, device: torch.device, seed: int = 0) -> JumpReLUSAE:
    """The slice `sl` of the SAE every rank would build from the same seed (sae/model.py init_tied)."""
    model = JumpReLUSAE(shape.D, sl.size, shape.eps, "reference")
    model.init_tied(0.1, torch.Generator().manual_seed(seed), first_latent=sl.start)
    return model.to(device)


def _batches(shape: Shape, n: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(shape.B, shape.D, generator=g).to(device) for _ in range(n)]


def check(mesh: Mesh, shape: Shape = CHECK_SHAPE, steps: int = 3) -> tuple[bool, str]:
    """The sharded step equals the one-process step (figures and gathered parameters, fp32 rule)."""
    optim = OptimConfig(lr=1e-2, adam_beta1=0.9, max_grad_norm=0.5)
    whole = _model(shape, latent_slice(shape.F, 1, 0), mesh.device)
    local = _model(shape, latent_slice(shape.F, mesh.world, mesh.rank), mesh.device)
    one, sharded = DenseStep(whole, optim), DenseStep(local, optim, mesh)
    tol = 4 * max(shape.B, shape.D, shape.F) * torch.finfo(torch.float32).eps * steps
    worst = 0.0
    for x in _batches(shape, steps, mesh.device):
        a, b = one(x, optim.lr, OBJECTIVE), sharded(x, optim.lr, OBJECTIVE)
        if a.l0 != b.l0:
            return False, f"L0 {b.l0} != {a.l0}"
        for name in ("loss", "mse", "grad_norm"):
            worst = max(worst, abs(getattr(a, name) - getattr(b, name)) / max(1.0, abs(getattr(a, name))))
    gathered = gather_sae(local, mesh, shape.F)
    for name, value in gathered.items():
        worst = max(worst, float((value - getattr(whole, name).detach()).abs().max()))
    return worst <= tol, f"largest difference {worst:.2e} (tolerance {tol:.2e})"


def time_step(step: DenseStep, mesh: Mesh, batches: list[torch.Tensor], warmup: int, reps: int) -> Timing:
    """Median seconds of `step` over `reps` steps after `warmup`, in lockstep on every rank of `mesh`."""
    sync = torch.cuda.synchronize if mesh.device.type == "cuda" else (lambda: None)
    for i in range(warmup):
        step(batches[i % len(batches)], 1e-4, OBJECTIVE)
    times, sent0 = [], mesh.sent_total()
    for i in range(reps):
        mesh.barrier("bench")
        sync()
        t0 = time.perf_counter()
        step(batches[i % len(batches)], 1e-4, OBJECTIVE)
        sync()
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=mesh.device)
        if mesh.world > 1:  # the step of the slowest rank: a collective waits for it
            torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX, group=mesh.group)
        times.append(float(elapsed))
    sent = mesh.sent_total() - sent0  # the steps' collectives (the barriers carry no payload; the MAX above is
    # torch.distributed's own, not the mesh's)
    return Timing(statistics.median(times), sent // reps)


def run_size(mesh: Mesh, size: str, warmup: int, reps: int) -> dict[str, Any]:
    shape = SAE_SIZES[size]
    ok, detail = check(mesh)
    record: dict[str, Any] = {"case": f"sharded-step/{size}", "world": mesh.world, "shape": shape._asdict()}
    backend = torch.distributed.get_backend(mesh.group) if mesh.world > 1 else "none"
    record.update(backend=backend, check=detail, status="ok" if ok else "MISMATCH")
    if not ok:
        return record
    optim = OptimConfig(lr=1e-4, adam_beta1=0.9)
    batches = _batches(shape, 2, mesh.device)
    sl = latent_slice(shape.F, mesh.world, mesh.rank)
    sharded = time_step(DenseStep(_model(shape, sl, mesh.device), optim, mesh), mesh, batches, warmup, reps)
    single = None
    if mesh.rank == 0:  # the one-process step of the same global shape, the others waiting
        one = DenseStep(_model(shape, latent_slice(shape.F, 1, 0), mesh.device), optim)
        single = time_step(one, Mesh.single(mesh.device), batches, warmup, reps).seconds
    mesh.barrier("bench")
    counted = step_bytes(shape.B, shape.D).total
    record.update(
        seconds=sharded.seconds,
        tokens_per_s=shape.B / sharded.seconds,
        single_seconds=single,
        single_tokens_per_s=None if single is None else shape.B / single,
        speedup=None if single is None else single / sharded.seconds,
        bytes_per_step=sharded.bytes_per_step,
        bytes_per_step_counted=counted,
    )
    if sharded.bytes_per_step != counted:
        record["status"] = "MISMATCH"
        record["check"] += f"; bytes per step measured {sharded.bytes_per_step} != counted {counted}"
    return record


class Expected(NamedTuple):
    size: str
    F: int
    bytes_per_rank: int
    comm_ms: float
    compute_ms: float

    @property
    def comm_share(self) -> float:
        return self.comm_ms / (self.comm_ms + self.compute_ms)


def expected_h100x8(F: int, B: int = 4096, D: int = 2304, gpus: int = 8, size: str = "") -> Expected:
    """What one sharded step should cost on `gpus` H100 SXM of one NVLink node: the collectives as ring
    all-reduces (each rank sends and receives 2 (N - 1) / N of the payload) at NVLINK_BUS_GBS plus
    COLLECTIVES_PER_STEP latencies, not overlapped with compute; the compute as bench/predict.py's dense fp32
    step on F / gpus latents."""
    payload = step_bytes(B, D).total
    comm_s = (
        2 * (gpus - 1) / gpus * payload / (NVLINK_BUS_GBS * 1e9) + COLLECTIVES_PER_STEP * ALLREDUCE_LATENCY_US * 1e-6
    )
    compute_s = sum(p.seconds(H100) for p in dense_step_parts(B, D, -(-F // gpus), FP32))
    return Expected(size, F, payload, comm_s * 1e3, compute_s * 1e3)


EXPECTED_SIZES = {"16k": 1 << 14, "262k": 1 << 18, "1m": 1 << 20, "4m": 1 << 22, "16m": 1 << 24}


def expected_table(gpus: int = 8) -> str:
    lines = [
        f"expected on {gpus} x H100 SXM, NVLink ({NVLINK_BUS_GBS:.0f} GB/s all-reduce bus bandwidth, "
        f"{ALLREDUCE_LATENCY_US:.0f} us per collective), B=4096 D=2304 fp32, dense step per GPU (bench/predict.py):",
        "| F | bytes per rank per step | collectives ms | compute ms per GPU | collectives' share |",
        "|---|---|---|---|---|",
    ]
    for size, F in EXPECTED_SIZES.items():
        e = expected_h100x8(F, gpus=gpus, size=size)
        lines.append(
            f"| {size} ({F:,}) | {e.bytes_per_rank / 1e6:.1f} MB | {e.comm_ms:.2f} | {e.compute_ms:.1f} | "
            f"{e.comm_share:.1%} |"
        )
    return "\n".join(lines)


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| case | ranks | backend | status | tokens/s sharded | tokens/s one process | speed-up | "
        "bytes/step/rank measured | counted |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['world']} | {r['backend']} | {r['status']}: {r['check']} |||||")
            continue
        lines.append(
            f"| {r['case']} | {r['world']} | {r['backend']} | ok | {r['tokens_per_s']:,.0f} | "
            f"{r['single_tokens_per_s']:,.0f} | {r['speedup']:.2f}x | {r['bytes_per_step']:,} | "
            f"{r['bytes_per_step_counted']:,} |"
        )
    return "\n".join(lines)


CASES = tuple(f"sharded-step/{size}" for size in SAE_SIZES)


def sizes_for(patterns: list[str] | None, device_type: str) -> list[str]:
    """The sizes `--case` globs select among CASES (default: offline on the CPU, offline to 1m on CUDA)."""
    if not patterns:
        return ["offline"] if device_type == "cpu" else ["offline", "16k", "65k", "262k", "1m"]
    chosen = [c for c in CASES if any(fnmatch.fnmatchcase(c, p) for p in patterns)]
    if not chosen:
        raise ValueError(f"--case {patterns} matches no distributed case; under torchrun the cases are {list(CASES)}")
    return [c.split("/")[1] for c in chosen]


def main(patterns: list[str] | None, json_path: str | None, quick: bool) -> int:
    """Run under torchrun; rank 0 prints the tables (and writes `json_path`); returns 1 on a mismatch."""
    mesh = Mesh.from_env()
    try:
        sizes = sizes_for(patterns, mesh.device.type)
        warmup, reps = (1, 3) if quick else (3, 10)
        records = [run_size(mesh, size, warmup, reps) for size in sizes]
        if mesh.rank == 0:
            print(table(records))
            print()
            print(expected_table())
            if json_path:
                doc = {"cases": records, "expected_h100x8": [e._asdict() for e in map(_expected, EXPECTED_SIZES)]}
                Path(json_path).write_text(json.dumps(doc, indent=2))
                print(f"wrote {json_path}")
        return 0 if all(r["status"] == "ok" for r in records) else 1
    finally:
        mesh.close()


def _expected(size: str) -> Expected:
    return expected_h100x8(EXPECTED_SIZES[size], size=size)
