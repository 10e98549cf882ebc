"""Checkpoint folders: an SAELens-style SAE (raw-activation space) plus the state to resume training.

    <out_dir>/checkpoints/step_000300/
        cfg.json                      SAELens-style config (RECIPES section 5)
        sae_weights.safetensors       W_enc [D, F], W_dec [F, D], b_enc [F], b_dec [D], threshold [F], raw space
        training_state.safetensors    training-space parameters, Adam moments, dead-latent counters, RNG
        training_state.json           step, tokens, activation scale, data position, the full TrainConfig
    <out_dir>/checkpoints/latest      name of the newest complete checkpoint folder

A folder is built under a temporary name and renamed into place, and `latest` is replaced atomically,
so a crash at any moment leaves the previous checkpoint intact. Nothing is pickled: safetensors and JSON.
The training-space parameters are stored exactly (not re-derived from the folded weights), so a resumed
run continues bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
"""The JumpReLU SAE's parameters, as named in sae_weights.safetensors, params.npz and training_state (`param.`
prefix); defined here, with the format, so that code reading checkpoints need not import the model."""
WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
STATE_TENSORS_FILE = "training_state.safetensors"
STATE_JSON_FILE = "training_state.json"
LATEST_FILE = "latest"
SHARDED_STATE_DIR = "sharded_state"  # a latent-sharded run's training state (sae/distributed/checkpoint.py)
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, corrupt or does not fit the run; the message names the problem."""


class CheckpointWriteError(CheckpointError, OSError):
    """Saving a checkpoint failed (a full disk, a write error); the previous checkpoint is still `latest`."""


class TrainingState(NamedTuple):
    """What `load_training_state` returns: everything needed to continue a run."""

    info: dict[str, Any]  # training_state.json: step, tokens, scale, data_position, config, ...
    tensors: dict[str, Tensor]  # training_state.safetensors


def sae_cfg(d_in: int, d_sae: int, metadata: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The SAELens-style cfg.json of an SAE whose saved weights act on raw activations."""
    return {
        "architecture": "jumprelu",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # the training scale is folded into the weights
        "metadata": metadata,
        "saekit": extra,
    }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_checkpoint(
    checkpoints_dir: Path,
    step: int,
    sae_weights: dict[str, Tensor],
    cfg: dict[str, Any],
    state_info: dict[str, Any],
    state_tensors: dict[str, Tensor],
    keep: int,
) -> Path:
    """Atomically write checkpoint `step`, point `latest` at it, prune to the newest `keep`. Returns its path."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:09d}"
    final = checkpoints_dir / name
    tmp = checkpoints_dir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _save_tensors(tmp / WEIGHTS_FILE, sae_weights)
        _write_json(tmp / CFG_FILE, cfg)
        _save_tensors(tmp / STATE_TENSORS_FILE, state_tensors)
        _write_json(tmp / STATE_JSON_FILE, {"format_version": FORMAT_VERSION, **state_info})
        _fsync_dir(tmp)
    except OSError as err:  # nothing renamed yet: `latest` still names the previous checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        latest = checkpoints_dir / LATEST_FILE
        previous = latest.read_text().strip() if latest.exists() else None
        raise CheckpointWriteError(
            f"could not write checkpoint {name} ({err}); "
            + (
                f"{checkpoints_dir / previous} is still the latest checkpoint: free space (or fix the disk) and "
                f"continue with --resume {checkpoints_dir.parent}"
                if previous
                else "no earlier checkpoint exists"
            )
        ) from err
    publish_checkpoint(checkpoints_dir, tmp, final, keep)
    return final


def publish_checkpoint(checkpoints_dir: Path, tmp: Path, final: Path, keep: int) -> None:
    """Rename the finished folder `tmp` to `final`, point `latest` at it, prune to the newest `keep`."""
    if final.exists():  # re-saving a step (e.g. Ctrl-C right after a periodic save): swap, then drop the old
        old = checkpoints_dir / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    latest_tmp = checkpoints_dir / f".{LATEST_FILE}.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, checkpoints_dir / LATEST_FILE)
    _fsync_dir(checkpoints_dir)
    for stale in sorted(_step_dirs(checkpoints_dir))[:-keep]:
        shutil.rmtree(stale[1])


def _step_dirs(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for p in checkpoints_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return out


def has_checkpoints(run_dir: Path) -> bool:
    checkpoints_dir = run_dir / "checkpoints"
    return checkpoints_dir.is_dir() and bool(_step_dirs(checkpoints_dir))


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a run folder, its checkpoints/ folder, or one checkpoint folder to a checkpoint folder."""
    path = Path(path)
    if (path / STATE_JSON_FILE).exists() or (path / WEIGHTS_FILE).exists():
        return path
    checkpoints_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not checkpoints_dir.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: the folder does not exist")
    latest = checkpoints_dir / LATEST_FILE
    if latest.exists():
        candidate = checkpoints_dir / latest.read_text().strip()
        if candidate.is_dir():
            return candidate
    steps = _step_dirs(checkpoints_dir)
    if not steps:
        raise CheckpointError(f"no checkpoint in {checkpoints_dir}: expected step_* folders or a '{LATEST_FILE}' file")
    return max(steps)[1]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"checkpoint is incomplete: {path.name} is missing from {path.parent}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt (not valid JSON: {err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is corrupt: expected a JSON object")
    return data


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise CheckpointError(f"checkpoint is incomplete: {path.name} is missing from {path.parent}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt (cannot be read as safetensors: {err})") from err


def load_sae_weights(folder: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load and validate an SAELens-style JumpReLU folder: (raw-space weights, cfg)."""
    folder = Path(folder)
    cfg = _read_json(folder / CFG_FILE)
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int):
            raise CheckpointError(f"{folder / CFG_FILE} is missing an integer '{key}'")
    if cfg.get("architecture", "jumprelu") != "jumprelu":
        raise CheckpointError(f"{folder} holds a '{cfg['architecture']}' SAE; saekit loads 'jumprelu' SAEs only")
    weights = _read_tensors(folder / WEIGHTS_FILE)
    check_weight_shapes(weights, cfg["d_in"], cfg["d_sae"], where=str(folder / WEIGHTS_FILE))
    return weights, cfg


def check_weight_shapes(weights: dict[str, Tensor], d_in: int, d_sae: int, where: str) -> None:
    expected = {
        "W_enc": (d_in, d_sae),
        "b_enc": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
        "threshold": (d_sae,),
    }
    for name in PARAM_NAMES:
        if name not in weights:
            raise CheckpointError(f"{where} has no tensor '{name}' (found {sorted(weights)})")
        if tuple(weights[name].shape) != expected[name]:
            raise CheckpointError(
                f"{where}: '{name}' has shape {tuple(weights[name].shape)}, expected {expected[name]} "
                f"for d_in={d_in}, d_sae={d_sae}"
            )


def load_training_info(folder: str | Path) -> dict[str, Any]:
    """training_state.json of a checkpoint (step, tokens, scale, data position, config), validated; no tensors."""
    folder = Path(folder)
    info = _read_json(folder / STATE_JSON_FILE)
    if info.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} has checkpoint format {info.get('format_version')!r}; this saekit reads format {FORMAT_VERSION}"
        )
    for key in ("step", "tokens", "scale", "config", "d_in", "d_sae"):
        if key not in info:
            raise CheckpointError(f"{folder / STATE_JSON_FILE} is missing '{key}'")
    return info


def load_training_state(folder: str | Path) -> TrainingState:
    """Load and validate the resumable state beside an SAE folder."""
    folder = Path(folder)
    info = load_training_info(folder)
    tensors = _read_tensors(folder / STATE_TENSORS_FILE)
    params = {name: tensors.get(f"param.{name}") for name in PARAM_NAMES}
    if any(v is None for v in params.values()):
        raise CheckpointError(f"{folder / STATE_TENSORS_FILE} lacks the training-space parameters")
    check_weight_shapes(params, info["d_in"], info["d_sae"], where=str(folder / STATE_TENSORS_FILE))
    return TrainingState(info, tensors)


def rng_state() -> dict[str, Tensor]:
    state = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["rng.cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def _check_tensors_file(path: Path) -> None:
    """The safetensors file is present and whole (its header read and its size checked; no tensor loaded)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint is incomplete: {path.name} is missing from {path.parent}")
    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt (cannot be read as safetensors: {err})") from err


def check_resumable(folder: Path) -> None:
    """Raise CheckpointError if `folder`'s training state cannot be read (cheap: JSON and file headers)."""
    info = load_training_info(folder)
    if info.get("sharded"):  # a latent-sharded run's state: DCP's files (sae/distributed/checkpoint.py)
        if not (folder / SHARDED_STATE_DIR / ".metadata").is_file():
            raise CheckpointError(
                f"checkpoint is incomplete: {folder / SHARDED_STATE_DIR} has no .metadata (the save did not finish)"
            )
        return
    _check_tensors_file(folder / STATE_TENSORS_FILE)


def resume_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder `--resume path` continues from, checked readable.

    A run folder whose newest checkpoint is damaged (a disk fault after it was written, a file removed) is
    not silently resumed from an older one, which would redo steps without the user knowing: the error names
    the newest intact earlier checkpoint and the flag that resumes from it.
    """
    folder = find_checkpoint(path)
    try:
        check_resumable(folder)
    except CheckpointError as err:
        if folder.resolve() == Path(path).resolve():
            raise  # the user named this very checkpoint
        older = [p for _, p in sorted(_step_dirs(folder.parent), reverse=True) if p != folder]
        for candidate in older:
            try:
                check_resumable(candidate)
            except CheckpointError:
                continue
            raise CheckpointError(
                f"the newest checkpoint cannot be resumed: {err}. The newest intact one is {candidate}: continue "
                f"from it with --resume {candidate} (the steps after it are trained again)"
            ) from err
        raise CheckpointError(f"the newest checkpoint cannot be resumed and no earlier one is intact: {err}") from err
    return folder
