"""Checkpoints of a latent-sharded run: the training state through torch.distributed.checkpoint (DCP), the SAE
exported whole.

A checkpoint folder of a run over W ranks (beside the one-process format of sae/checkpoint.py, same step
folders, same `latest` pointer, same pruning):

    step_000000100/sae_weights.safetensors   the whole SAE in raw space (SAELens layout), written by rank 0 in
    step_000000100/cfg.json                  blocks received from every rank: no rank holds the whole SAE
    step_000000100/training_state.json       step, tokens, scale, config, data position, {"sharded": {"world": W}}
    step_000000100/sharded_state/            DCP: every latent-indexed tensor as a DTensor sharded on its latent
                                             dimension (parameters, Adam moments, dead-latent counters); b_dec,
                                             its moments and Adam's step counts replicated (written once)
    step_000000100/rng_rank_00001.safetensors  each rank's RNG state (restored only on as many ranks)

DCP reshards on load, so the state resumes on any number of ranks whose split of the latents exists
(sae/distributed/layout.py), one process included. Writing is atomic: every rank writes into a temporary folder
and rank 0 renames it once all ranks report success, so a crash mid-save leaves the previous checkpoint.
The checkpoints folder must be shared by all ranks (one machine, or a shared filesystem across machines).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor

from sae import checkpoint as ckpt
from sae.distributed.layout import LATENT_DIM, LatentSlice, latent_slice
from sae.distributed.mesh import Mesh

SHARDED_DIR = ckpt.SHARDED_STATE_DIR
_RNG_FILE = "rng_rank_{rank:05d}.safetensors"
_EXPORT_BLOCK_BYTES = 1 << 26  # rank 0 holds about this much of the SAE at a time while exporting
_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
}


def latent_dim(key: str) -> int | None:
    """The latent dimension of a training-state tensor key ("param.W_enc", "optim.W_dec.exp_avg",
    "tokens_since_fired"), or None for a replicated one (b_dec, its moments, Adam's step counts)."""
    if key == "tokens_since_fired":
        return 0
    parts = key.split(".")
    if len(parts) >= 2 and parts[0] in ("param", "optim") and parts[1] in LATENT_DIM:
        if parts[0] == "param" or parts[-1] != "step":
            return LATENT_DIM[parts[1]]
    return None


def _device_mesh(mesh: Mesh):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(mesh.device.type, (mesh.world,))


def _global_shape(local: Tensor, dim: int, d_sae: int) -> torch.Size:
    shape = list(local.shape)
    shape[dim] = d_sae
    return torch.Size(shape)


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= size
    return tuple(reversed(stride))


def _as_dtensors(local: dict[str, Tensor], mesh: Mesh, d_sae: int) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor, Shard

    device_mesh = _device_mesh(mesh)
    out: dict[str, Any] = {}
    for key, value in local.items():
        dim = latent_dim(key)
        if dim is None:
            out[key] = value
            continue
        shape = _global_shape(value, dim, d_sae)
        out[key] = DTensor.from_local(
            value.contiguous(),
            device_mesh,
            [Shard(dim)],
            run_check=False,
            shape=shape,
            stride=_contiguous_stride(shape),
        )
    return out


def _all_ok(mesh: Mesh, ok: bool) -> bool:
    """Whether every rank's part succeeded (a collective)."""
    if mesh.world == 1:
        return ok
    failed = torch.tensor([0.0 if ok else 1.0], device=mesh.device)
    mesh.all_reduce_sum_(failed, "checkpoint")
    return float(failed) == 0


def save_sharded(
    checkpoints_dir: Path,
    step: int,
    mesh: Mesh,
    state: dict[str, Tensor],
    rng: dict[str, Tensor],
    info: dict[str, Any],
    export: tuple[dict[str, Tensor], dict[str, Any]],
    keep: int,
) -> Path:
    """Write checkpoint `step` of a latent-sharded run (a collective: every rank calls it at the same step).

    state: this rank's training-state tensors (its slices of the latent-indexed ones; see `latent_dim`).
    rng: this rank's RNG state. info: training_state.json (rank 0's is written; d_sae is the whole SAE's).
    export: (this rank's slice of the raw-space weights, cfg.json), streamed into one whole sae_weights file.
    """
    d_sae = int(info["d_sae"])
    name = f"step_{step:09d}"
    final = checkpoints_dir / name
    tmp = checkpoints_dir / f".tmp-{name}"
    lead = mesh.rank == 0
    error: BaseException | None = None
    if lead:
        try:
            checkpoints_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as err:
            error = err
    if _all_ok(mesh, error is None):
        try:
            dcp.save(_as_dtensors(state, mesh, d_sae), checkpoint_id=tmp / SHARDED_DIR, process_group=mesh.group)
            ckpt._save_tensors(tmp / _RNG_FILE.format(rank=mesh.rank), rng)
        except OSError as err:
            error = err
    if _all_ok(mesh, error is None):
        weights, cfg = export
        try:
            export_whole(tmp, mesh, weights, cfg, d_sae)
            if lead:
                ckpt._write_json(tmp / ckpt.STATE_JSON_FILE, {"format_version": ckpt.FORMAT_VERSION, **info})
                ckpt._fsync_dir(tmp)
        except OSError as err:
            error = err
    if not _all_ok(mesh, error is None):
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        what = f"this rank ({mesh.rank}): {error}" if error is not None else "another rank (see its output)"
        raise ckpt.CheckpointWriteError(
            f"could not write checkpoint {name}, failed on {what}; the previous checkpoint is still the latest: fix "
            f"the disk and continue with --resume {checkpoints_dir.parent}"
        )
    if lead:
        ckpt.publish_checkpoint(checkpoints_dir, tmp, final, keep)
    mesh.barrier("checkpoint")
    return final


def is_sharded(folder: Path) -> bool:
    """Whether `folder` holds the state of a latent-sharded run (DCP) rather than one training_state file."""
    return (Path(folder) / SHARDED_DIR).is_dir()


def load_sharded(folder: Path, mesh: Mesh, sl: LatentSlice) -> ckpt.TrainingState:
    """This rank's slice `sl` of the training state in `folder`, saved on any number of ranks (DCP reshards);
    one process (mesh world 1, no process group) reads every latent. RNG state only when the world is the same.

    Raises CheckpointError for an incomplete or unreadable state or one of another SAE shape.
    """
    folder = Path(folder)
    info = ckpt.load_training_info(folder)
    d_sae = int(info["d_sae"])
    if sl.d_sae != d_sae:
        raise ckpt.CheckpointError(f"{folder} holds an SAE of {d_sae} latents, not {sl.d_sae}")
    metadata = read_metadata(folder)
    template: dict[str, Tensor] = {}
    for key, meta in metadata.state_dict_metadata.items():
        size = getattr(meta, "size", None)
        dtype = getattr(getattr(meta, "properties", None), "dtype", None)
        if size is None or dtype is None:
            continue  # not a tensor
        shape = list(size)
        dim = latent_dim(key)
        if dim is not None:
            if shape[dim] != d_sae:
                raise ckpt.CheckpointError(f"{folder / SHARDED_DIR}: {key} has {shape[dim]} latents, not {d_sae}")
            shape[dim] = sl.size
        template[key] = torch.empty(shape, dtype=dtype, device=mesh.device)
    if mesh.world > 1:
        state: dict[str, Any] = _as_dtensors(template, mesh, d_sae)
        dcp.load(state, checkpoint_id=folder / SHARDED_DIR, process_group=mesh.group)
        tensors = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in state.items()}
    else:
        with warnings.catch_warnings():  # DCP warns that it assumes one process: it is one process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(template, checkpoint_id=folder / SHARDED_DIR, no_dist=True)
        tensors = template
    saved_world = int(info.get("sharded", {}).get("world", 0))
    rng_file = folder / _RNG_FILE.format(rank=mesh.rank)
    if saved_world == mesh.world and rng_file.exists():
        tensors.update(ckpt._read_tensors(rng_file))
    return ckpt.TrainingState(info, tensors)


def read_metadata(folder: Path):
    """DCP's metadata of the state in `folder`, or CheckpointError naming what is missing or damaged."""
    path = Path(folder) / SHARDED_DIR
    if not (path / ".metadata").is_file():
        raise ckpt.CheckpointError(f"checkpoint is incomplete: {path} has no .metadata (the save did not finish)")
    try:
        return dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # unpickling a damaged file raises anything
        raise ckpt.CheckpointError(f"{path}/.metadata is corrupt ({type(err).__name__}: {err})") from err


# -- the whole export, streamed ----------------------------------------------------------------------------


def _blocks(rows: int, row_bytes: int, block_bytes: int) -> list[tuple[int, int]]:
    step = max(1, block_bytes // max(row_bytes, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def export_whole(
    folder: Path,
    mesh: Mesh,
    weights: dict[str, Tensor],
    cfg: dict[str, Any],
    d_sae: int,
    block_bytes: int | None = None,
) -> None:
    """Write `folder`/sae_weights.safetensors and cfg.json of the whole SAE from every rank's slice `weights`
    (raw space, SAE.export_raw of the slice): a collective. Rank 0 writes the file tensor by tensor, receiving
    each rank's part in blocks of about `block_bytes` (default 64 MiB), so no rank holds the whole SAE. The file
    is a plain safetensors file, tensor for tensor equal to the one-process export."""
    block_bytes = block_bytes or _EXPORT_BLOCK_BYTES
    slices = [latent_slice(d_sae, mesh.world, r) for r in range(mesh.world)]
    d_in = weights["b_dec"].shape[0]
    dtype = weights["W_enc"].dtype
    itemsize = dtype.itemsize
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    shapes["threshold"] = (d_sae,)
    order = ("W_enc", "W_dec", "b_enc", "threshold", "b_dec")
    lead = mesh.rank == 0
    fh = None
    if lead:
        header: dict[str, Any] = {}
        offset = 0
        for name in order:
            size = itemsize
            for n in shapes[name]:
                size *= n
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[dtype],
                "shape": list(shapes[name]),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        fh = open(folder / ckpt.WEIGHTS_FILE, "wb")  # noqa: SIM115 -- closed below, after the collective loop
        fh.write(struct.pack("<Q", len(raw)) + raw)
    try:
        # W_enc [D, F] is split by columns: row blocks, each assembled from every rank's columns.
        for start, stop in _blocks(d_in, d_sae * itemsize, block_bytes):
            parts = _gather_to_lead(mesh, weights["W_enc"][start:stop], slices, dim=1)
            if fh is not None:
                fh.write(_bytes(torch.cat(parts, dim=1)))
        for name in ("W_dec", "b_enc", "threshold"):  # split by rows: rank after rank, each in blocks
            local = weights[name]
            row_bytes = itemsize * (local[0].numel() if local.dim() > 1 else 1)
            for r, sl in enumerate(slices):
                for begin, stop in _blocks(sl.size, row_bytes, block_bytes):
                    rows = (stop - begin, *local.shape[1:])
                    part = _send_to_lead(mesh, r, local[begin:stop] if mesh.rank == r else None, rows, local.dtype)
                    if fh is not None:
                        fh.write(_bytes(part))
        if fh is not None:
            fh.write(_bytes(weights["b_dec"]))
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        if fh is not None:
            fh.close()
    if lead:
        ckpt._write_json(folder / ckpt.CFG_FILE, cfg)


def _bytes(t: Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()


def _gather_to_lead(mesh: Mesh, block: Tensor, slices: list[LatentSlice], dim: int) -> list[Tensor]:
    """Every rank's `block` (the same rows, its slice's columns) on rank 0, in rank order; others get []."""
    shape = list(block.shape)
    parts = []
    for r, sl in enumerate(slices):
        shape[dim] = sl.size
        part = _send_to_lead(mesh, r, block if mesh.rank == r else None, tuple(shape), block.dtype)
        if mesh.rank == 0:
            parts.append(part)
    return parts


def _send_to_lead(
    mesh: Mesh, source: int, block: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype
) -> Tensor | None:
    """Rank `source`'s `block` (of `shape`) on rank 0 (None on the others): point to point, nothing to the rest."""
    if source == 0:
        return block.contiguous() if mesh.rank == 0 else None
    if mesh.rank == source:
        dist.send(block.contiguous(), dst=dist.get_global_rank(mesh.group, 0), group=mesh.group)
        return None
    if mesh.rank != 0:
        return None
    part = torch.empty(shape, dtype=dtype, device=mesh.device)
    dist.recv(part, src=dist.get_global_rank(mesh.group, source), group=mesh.group)
    return part
