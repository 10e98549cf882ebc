"""Input checks shared by the reference and the kernels, run before any work so a mistake names itself."""

from __future__ import annotations

from torch import Tensor


def check_sae_inputs(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, threshold: Tensor, bandwidth: float
) -> None:
    """Raise ValueError naming the offending argument when shapes, dtypes or devices do not fit together."""
    if x.dim() != 2:
        raise ValueError(f"x must be [B, D] (tokens x d_in); got shape {tuple(x.shape)}. Flatten leading dims first.")
    if W_enc.dim() != 2:
        raise ValueError(f"W_enc must be [D, F]; got shape {tuple(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    expected = {
        "x": (x, (x.shape[0], d_in)),
        "b_enc": (b_enc, (d_sae,)),
        "W_dec": (W_dec, (d_sae, d_in)),
        "b_dec": (b_dec, (d_in,)),
        "threshold": (threshold, (d_sae,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but W_enc [D={d_in}, F={d_sae}] implies {shape}"
            )
    for name, tensor in {"W_enc": W_enc, **{k: v for k, (v, _) in expected.items()}}.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}; move them to one device")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0; got {bandwidth}")
