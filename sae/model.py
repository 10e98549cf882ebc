"""The JumpReLU SAE module: fp32 master parameters, initialisation, and the raw-space export."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kernels.reference import Forward
from sae.ops import sae_forward

PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
THRESHOLD_FLOOR = 1e-6  # thresholds are clamped to at least this after each step: JumpReLU needs theta > 0


class JumpReLUSAE(nn.Module):
    """JumpReLU SAE with parameters W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], threshold [F].

    It works in whatever space it is trained in; `export_raw` folds an activation scale into the weights.
    """

    def __init__(self, d_in: int, d_sae: int, bandwidth: float = 0.001, backend: str = "reference"):
        super().__init__()
        self.d_in, self.d_sae, self.bandwidth, self.backend = d_in, d_sae, bandwidth, backend
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.threshold = nn.Parameter(torch.zeros(d_sae))

    @torch.no_grad()
    def init_tied(self, threshold: float, generator: torch.Generator | None = None) -> None:
        """RECIPES init: W_dec rows He-uniform then unit norm, W_enc = W_dec^T, biases 0, theta constant."""
        bound = math.sqrt(6.0 / self.d_in)  # He-uniform, fan_in = d_in for the decoder rows
        w = torch.empty(self.d_sae, self.d_in).uniform_(-bound, bound, generator=generator)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.fill_(threshold)

    @torch.no_grad()
    def init_thresholds_for_l0(self, x: Tensor, l0: float, floor: float) -> None:
        """Per-latent thresholds at the (1 - l0/F) quantile of each latent's pre-activations on x [B, D].

        Each latent then fires on about l0/F of these tokens, so the mean L0 starts near l0 and no latent
        starts dead. Thresholds never go below `floor` (> 0).
        """
        z = (x - self.b_dec) @ self.W_enc + self.b_enc
        fires = min(max(round(x.shape[0] * l0 / self.d_sae), 1), x.shape[0] - 1)
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
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold, self.bandwidth, backend=self.backend
        )

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
