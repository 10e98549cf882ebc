"""The JumpReLU SAE module: fp32 master parameters, initialisation, and the raw-space export.

Mixed precision (`compute_dtype`, e.g. torch.bfloat16 on an H100): the parameters stay fp32 (RECIPES: fp32 master
weights; bf16 thresholds stopped learning), x, W_enc and W_dec enter the products as bf16, every sum and gradient
is fp32 (`kernels.reference` module docstring). The sparse training step keeps bf16 copies of W_enc and W_dec in
an `OperandCache` instead of casting both [F, D] matrices every step.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor, nn

from kernels.reference import Forward
from kernels.validate import check_compute_dtype, rounds_to
from sae.checkpoint import PARAM_NAMES  # noqa: F401 -- re-exported: the model's parameters are the format's
from sae.ops import sae_forward

THRESHOLD_FLOOR = 1e-6  # thresholds are clamped to at least this after each step: JumpReLU needs theta > 0
_INIT_BLOCK_ELEMENTS = 1 << 26  # init_tied draws the rows before a slice in blocks of about this many numbers


class OperandCache:
    """compute_dtype copies of W_enc [D, F] and W_dec [F, D], equal to the masters rounded, updated by latent.

    The sparse step writes the masters only at the T latents it touched; `refresh` re-rounds exactly those
    (T * D * 6 bytes per matrix) instead of re-casting all F (F * D * 6 bytes: at D = 2304, F = 2^20 about 29 GB
    of HBM traffic for both, ~9 ms on an H100, a third of the step's encode). The price is the copies' memory,
    2 * D * F * 2 bytes (9.7 GB there, what a per-step cast also needs transiently at its peak).

    Staleness is detected, not assumed: torch bumps a tensor's `_version` on every in-place write (optimizer
    steps, `copy_` from a checkpoint, `init_tied`, `load_raw`, `normalize_decoder`), and `get` re-casts a copy
    whose master's storage or version differs from the one recorded when the copy was last made consistent.
    Only `refresh` may record a write without re-casting, and only `sparse_train_step` calls it, right after
    its own writes, all at the touched latents.
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._copies: dict[str, tuple[Tensor, tuple]] = {}  # name -> (copy, `_stamp` of its master when made)
        self.full_casts = 0  # full casts so far, one per matrix when first made (the tests check no more follow)

    def __getstate__(self) -> dict:
        """A copied or pickled model starts with no copies (they are derived data, re-made on first use)."""
        return {"dtype": self.dtype, "_copies": {}, "full_casts": 0}

    @staticmethod
    def _stamp(param: Tensor) -> tuple:
        """Which tensor, which storage, which write: any in-place write or `.data` swap changes it."""
        return weakref.ref(param), param.data_ptr(), param._version, param.dtype, param.device

    def _fresh(self, name: str, param: Tensor) -> bool:
        if name not in self._copies:
            return False
        ref, *rest = self._copies[name][1]
        return ref() is param and tuple(rest) == self._stamp(param)[1:]

    def get(self, model: JumpReLUSAE) -> tuple[Tensor, Tensor]:
        """(W_enc, W_dec) in `dtype`, re-cast first where the master changed since the copy was made."""
        out = []
        for name in ("W_enc", "W_dec"):
            param = getattr(model, name)
            if not self._fresh(name, param):
                self._copies[name] = (param.detach().to(self.dtype).contiguous(), self._stamp(param))
                self.full_casts += 1
            out.append(self._copies[name][0])
        return out[0], out[1]

    @torch.no_grad()
    def refresh(self, model: JumpReLUSAE, touched: Tensor) -> None:
        """Re-round the `touched` latents (W_enc columns, W_dec rows) after the caller wrote exactly those."""
        for name, dim in (("W_enc", 1), ("W_dec", 0)):
            if name not in self._copies:
                continue
            param = getattr(model, name)
            copy = self._copies[name][0]
            copy.index_copy_(dim, touched, param.detach().index_select(dim, touched).to(self.dtype))
            self._copies[name] = (copy, self._stamp(param))


class JumpReLUSAE(nn.Module):
    """JumpReLU SAE with parameters W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], threshold [F].

    It works in whatever space it is trained in; `export_raw` folds an activation scale into the weights.
    compute_dtype: the products' operand dtype (module docstring), e.g. torch.bfloat16; None or torch.float32
    (default): the products run in the parameters' own dtype (also a float64 copy's, as the tests' oracle).
    The parameters are fp32 whatever it is.
    """

    def __init__(
        self, d_in: int, d_sae: int, bandwidth: float = 0.001, backend: str = "reference",
        compute_dtype: torch.dtype | None = None,
    ):  # fmt: skip
        super().__init__()
        self.d_in, self.d_sae, self.bandwidth, self.backend = d_in, d_sae, bandwidth, backend
        self.compute_dtype = compute_dtype
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.threshold = nn.Parameter(torch.zeros(d_sae))

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The products' operand dtype; None: the parameters' own (torch.float32 is stored as None)."""
        return self._compute_dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype | None) -> None:
        check_compute_dtype(dtype)
        self._compute_dtype = None if dtype == torch.float32 else dtype
        # Kept copies for the sparse step (fp32 masters); None when the products run in the masters' dtype.
        self.operand_cache = OperandCache(dtype) if rounds_to(torch.float32, dtype) else None

    @torch.no_grad()
    def init_tied(self, threshold: float, generator: torch.Generator | None = None, first_latent: int = 0) -> None:
        """RECIPES init: W_dec rows He-uniform then unit norm, W_enc = W_dec^T, biases 0, theta constant.

        first_latent: this model holds the latents [first_latent, first_latent + d_sae) of a larger SAE (one rank's
        slice, sae/distributed): the generator's stream is drawn row by row from latent 0, in blocks, and the rows
        before the slice are discarded, so the slice equals those rows of the whole SAE's init (CPU generators
        draw uniform_ sequentially: blocks give the same numbers as one draw) without holding the whole SAE.
        """
        bound = math.sqrt(6.0 / self.d_in)  # He-uniform, fan_in = d_in for the decoder rows
        block = max(1, _INIT_BLOCK_ELEMENTS // self.d_in)
        for start in range(0, first_latent, block):  # the rows of the latents before this slice
            torch.empty(min(block, first_latent - start), self.d_in).uniform_(-bound, bound, generator=generator)
        w = torch.empty(self.d_sae, self.d_in).uniform_(-bound, bound, generator=generator)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.fill_(threshold)

    @torch.no_grad()
    def init_thresholds_for_l0(self, x: Tensor, l0: float, floor: float, total_latents: int | None = None) -> None:
        """Per-latent thresholds at the (1 - l0/F) quantile of each latent's pre-activations on x [B, D].

        Each latent then fires on about l0/F of these tokens, so the mean L0 starts near l0 and no latent
        starts dead. Thresholds never go below `floor` (> 0). total_latents: F of the whole SAE when this model
        holds one rank's slice of it (default: this model's d_sae).
        """
        z = (x - self.b_dec) @ self.W_enc + self.b_enc
        fires = min(max(round(x.shape[0] * l0 / (total_latents or self.d_sae)), 1), x.shape[0] - 1)
        # theta = the (fires + 1)-th largest z per latent, so exactly `fires` tokens lie above it.
        theta = z.topk(fires + 1, dim=0).values[-1]
        self.threshold.copy_(theta.clamp_min(floor))

    @torch.no_grad()
    def load_raw(self, weights: dict[str, Tensor], scale: float) -> None:
        """Start from raw-space weights (the inverse of `export_raw`), with unit-norm decoder rows.

        Moving to the space of scale * x: W_enc / s, W_dec * s, b_dec * s. A JumpReLU latent is positively
        homogeneous (n z > n theta iff z > theta), so dividing decoder row j by its norm n_j while multiplying
        W_enc[:, j], b_enc[j] and theta[j] by n_j leaves every reconstruction unchanged.
        """
        W_dec = weights["W_dec"].to(self.W_dec) * scale
        norms = W_dec.norm(dim=1).clamp_min(1e-12)  # a zero row stays zero
        self.W_dec.copy_(W_dec / norms[:, None])
        self.W_enc.copy_(weights["W_enc"].to(self.W_enc) / scale * norms)
        self.b_enc.copy_(weights["b_enc"].to(self.b_enc) * norms)
        self.threshold.copy_(weights["threshold"].to(self.threshold) * norms)
        self.b_dec.copy_(weights["b_dec"].to(self.b_dec) * scale)

    def forward(self, x: Tensor) -> Forward:
        return sae_forward(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold, self.bandwidth, backend=self.backend,
            compute_dtype=self.compute_dtype,
        )  # fmt: skip

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from each W_dec row's gradient its component parallel to the (unit-norm) row."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad.sub_(parallel * self.W_dec)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Renormalise every W_dec row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def export_raw(self, scale: float) -> dict[str, Tensor]:
        """Parameters that act on raw activations x when this SAE was trained on scale * x.

        With x_s = s * x: z = (s x - b_dec) W_enc + b_enc = (x - b_dec / s)(s W_enc) + b_enc, so the
        activations are unchanged, and x_hat = (f W_dec + b_dec) / s = f (W_dec / s) + b_dec / s.
        """
        return {
            "W_enc": (self.W_enc * scale).contiguous(),
            "b_enc": self.b_enc.detach().clone(),
            "W_dec": (self.W_dec / scale).contiguous(),
            "b_dec": (self.b_dec / scale).contiguous(),
            "threshold": self.threshold.detach().clone(),
        }
