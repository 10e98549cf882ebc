"""Existing SAEs to start from: this project's checkpoints, SAELens-style folders, Gemma Scope `params.npz`.

All three hold raw-activation-space weights W_enc [D, F], W_dec [F, D], b_enc [F], b_dec [D], threshold [F].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sae import checkpoint as ckpt
from sae.checkpoint import PARAM_NAMES


def load_pretrained(path: str | Path) -> dict[str, Tensor]:
    """Raw-space float32 weights of the JumpReLU SAE at `path` (a .npz file, an SAE folder or a run folder)."""
    path = Path(path)
    if path.suffix == ".npz":
        return _load_npz(path)
    if not path.exists():
        raise ckpt.CheckpointError(f"no SAE at {path}: pass a checkpoint or SAELens folder, or a params.npz file")
    folder = path if (path / ckpt.WEIGHTS_FILE).exists() else ckpt.find_checkpoint(path)
    weights, cfg = ckpt.load_sae_weights(folder)
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise ckpt.CheckpointError(
            f"{folder} expects activations normalised with {norm!r}; only SAEs that act on raw activations "
            "(normalize_activations 'none') can be loaded"
        )
    return {name: weights[name].float() for name in PARAM_NAMES}


def _load_npz(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise ckpt.CheckpointError(f"no file {path}")
    try:
        with np.load(path) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as err:
        raise ckpt.CheckpointError(f"{path} is not a readable .npz file: {err}") from err
    missing = [name for name in PARAM_NAMES if name not in arrays]
    if missing:
        raise ckpt.CheckpointError(f"{path} lacks {missing}; a Gemma Scope params.npz has {list(PARAM_NAMES)}")
    if arrays["W_enc"].ndim != 2:
        raise ckpt.CheckpointError(f"{path}: W_enc must be [d_in, d_sae]; got shape {arrays['W_enc'].shape}")
    d_in, d_sae = arrays["W_enc"].shape
    weights = {name: torch.from_numpy(np.asarray(arrays[name], dtype=np.float32)) for name in PARAM_NAMES}
    ckpt.check_weight_shapes(weights, d_in, d_sae, where=str(path))
    return weights
