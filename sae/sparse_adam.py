"""Adam with beta1 = 0 whose step reads and writes only the latents that received a gradient.

With betas (0, beta2), Adam's first moment is this step's gradient (m_t = g_t), so a parameter entry whose
gradient is zero this step receives no update; only its second moment decays, v <- beta2 * v (RECIPES.md
section 1, last note). `LazyAdam` defers that decay: it records, per latent, the step at which the latent's
second moments were last brought up to date, and applies the k pending decays as one factor beta2**k the next
time the latent is touched. A step therefore costs O(T) in the touched latents (T) instead of O(F).

The result equals `torch.optim.Adam(params, lr, betas=(0.0, beta2), eps)` (single-tensor path, torch 2.13,
`torch/optim/adam.py::_single_tensor_adam`, capturable=False) in exact arithmetic. Per parameter and step t
(counted from 1, incremented every step whether or not an entry's gradient is zero), torch computes

    exp_avg.lerp_(grad, 1 - beta1)                              # beta1 = 0: exp_avg = grad, exactly
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step                          # = 1 for beta1 = 0, so step_size = lr
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)   # eps after the bias correction
    param.addcdiv_(exp_avg, denom, value=-step_size)

and `LazyAdam` runs the same operations, in the same order and dtype, on the touched slices, with
`mul_(beta2)` replaced by `mul_(beta2**(k + 1))` for a latent last touched k steps ago (the factor rounded
once to the parameter's dtype; for k = 0 it is the same rounded beta2). A latent touched on every step so far
therefore goes through torch's exact operations (bit-identical in the tests); otherwise the result differs
only by the rounding of one multiplication by beta2**(k+1) against k+1 repeated ones. An untouched latent's
parameter entries are never written, and in torch they receive an update of exactly -0.0, so they agree
bit for bit.

Shapes (B tokens, D d_in, F d_sae, T touched latents):

    parameter      latent_dim   stored     compact gradient passed to `step`
    W_enc          1            [D, F]     [D, T]   columns of the touched latents, in `touched` order
    W_dec          0            [F, D]     [T, D]
    b_enc          0            [F]        [T]
    threshold      0            [F]        [T]
    b_dec          None         [D]        [D]      dense: a plain Adam(0, beta2) update every step

One `touched` set is shared by all latent parameters (one last-touched step per latent): it must be the union
of every latent that has a non-zero gradient in any latent parameter this step (fired anywhere in the batch,
or had a pair in the threshold's straight-through window). Including a latent whose gradients are all zero
is harmless and exact; leaving out one with a non-zero gradient silently drops that gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class _Slot:
    param: Tensor
    exp_avg_sq: Tensor
    latent_dim: int | None


class LazyAdam:
    """Adam with betas (0, beta2) over SAE parameters indexed by latent, updating only touched latents.

    There is no beta1 argument: the lazy decay is exact only because beta1 = 0 makes an entry with zero
    gradient receive no update. The learning rate is an argument of `step`, so schedules need no param groups.

    Usage::

        opt = LazyAdam(num_latents=F, beta2=0.999, eps=1e-8)
        opt.add("W_enc", sae.W_enc, latent_dim=1)
        opt.add("W_dec", sae.W_dec, latent_dim=0)
        opt.add("b_enc", sae.b_enc, latent_dim=0)
        opt.add("threshold", sae.threshold, latent_dim=0)
        opt.add("b_dec", sae.b_dec, latent_dim=None)
        # Compact gradients from the backward: dW_enc [D, T], dW_dec [T, D], db_enc and dthreshold [T].
        opt.step({"W_enc": dW_enc, "W_dec": dW_dec, "b_enc": db_enc, "threshold": dthreshold,
                  "b_dec": db_dec}, touched, lr=lr_at(step))

    Args:
        num_latents: F, the size of every latent parameter along its `latent_dim`.
        beta2: second-moment decay, in [0, 1).
        eps: added to the bias-corrected sqrt(v), as torch's Adam does.
        validate: check on every step that `touched` is in range and has no duplicates. Both checks read a
            value back from the device (a synchronisation on a GPU); shapes and dtypes are always checked.
    """

    def __init__(self, num_latents: int, *, beta2: float = 0.999, eps: float = 1e-8, validate: bool = True):
        if num_latents < 1:
            raise ValueError(f"num_latents must be at least 1; got {num_latents}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"beta2 must lie in [0, 1); got {beta2}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be non-negative; got {eps}")
        self.num_latents = num_latents
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.validate = validate
        self._slots: dict[str, _Slot] = {}
        self._step = 0
        # [F] int64: the step up to which each latent's second moments have been decayed (made by `add`).
        self._last_step: Tensor | None = None

    @property
    def step_count(self) -> int:
        """Number of `step` calls so far (torch's per-parameter `step`, the same for every parameter)."""
        return self._step

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def add(self, name: str, param: Tensor, latent_dim: int | None) -> None:
        """Register `param` under `name`; `latent_dim` is the dim that indexes latents, None for a dense one."""
        if self._step > 0:
            raise RuntimeError(f"add {name!r} before the first step: its Adam step count would differ from the others")
        if name in self._slots:
            raise ValueError(f"a parameter named {name!r} is already registered")
        if not param.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {param.dtype}")
        if self._slots and param.device != next(iter(self._slots.values())).param.device:
            raise ValueError(f"{name} is on {param.device}; all parameters must share one device")
        if latent_dim is not None:
            if not 0 <= latent_dim < param.dim():
                raise ValueError(f"{name} has {param.dim()} dims; latent_dim {latent_dim} is out of range")
            if param.shape[latent_dim] != self.num_latents:
                raise ValueError(
                    f"{name} has shape {tuple(param.shape)}: dim {latent_dim} should have num_latents="
                    f"{self.num_latents} entries"
                )
            if self._last_step is None:
                self._last_step = torch.zeros(self.num_latents, dtype=torch.int64, device=param.device)
        self._slots[name] = _Slot(param, torch.zeros_like(param, memory_format=torch.preserve_format), latent_dim)

    @torch.no_grad()
    def step(self, grads: Mapping[str, Tensor], touched: Tensor, lr: float | Mapping[str, float]) -> None:
        """One Adam step.

        Args:
            grads: one gradient per registered name: for a latent parameter the compact gradient of the touched
                latents (the parameter's shape with `latent_dim` of size T, in `touched` order), for a dense one
                the full gradient. Clip before calling: the compact gradients have the dense ones' norm.
            touched: [T] int64 latent ids, distinct, in [0, num_latents), on the parameters' device; any order.
            lr: the learning rate this step, one for all parameters or one per name.
        """
        lrs = self._check(grads, touched, lr)
        t = self._step + 1
        bias_correction2_sqrt = (1.0 - self.beta2**t) ** 0.5
        # [T] beta2 ** (pending decays + this step's), in fp64; rounded once to each parameter's dtype below.
        decay = self._decay_since_last_touch(t, touched)
        for name, slot in self._slots.items():
            grad = grads[name]
            if slot.latent_dim is None:
                _adam_update(
                    slot.param,
                    slot.exp_avg_sq,
                    grad,
                    self.beta2,
                    self.beta2,
                    bias_correction2_sqrt,
                    self.eps,
                    lrs[name],
                )
                continue
            dim = slot.latent_dim
            shape = [1] * slot.param.dim()
            shape[dim] = -1
            # Gather the touched slices (T/F of the bytes), update them in place, scatter them back.
            param = slot.param.index_select(dim, touched)
            exp_avg_sq = slot.exp_avg_sq.index_select(dim, touched)
            _adam_update(
                param,
                exp_avg_sq,
                grad,
                decay.to(slot.param.dtype).view(shape),
                self.beta2,
                bias_correction2_sqrt,
                self.eps,
                lrs[name],
            )
            slot.param.index_copy_(dim, touched, param)
            slot.exp_avg_sq.index_copy_(dim, touched, exp_avg_sq)
        if self._last_step is not None:
            self._last_step[touched] = t
        self._step = t

    def _decay_since_last_touch(self, t: int, latents: Tensor | None = None) -> Tensor:
        """[T] fp64 beta2 ** (t - last step at which each latent was brought up to date); all latents if None."""
        if self._last_step is None:
            return torch.ones(0, dtype=torch.float64)
        last = self._last_step if latents is None else self._last_step[latents]
        return torch.tensor(self.beta2, dtype=torch.float64, device=last.device).pow(t - last)

    @torch.no_grad()
    def finalize(self) -> None:
        """Apply every pending decay, so each second moment equals torch's Adam state at this step.

        Reads and writes every latent (O(F)); needed only to compare with, or export to, a dense Adam state.
        Steps after it continue with the same mathematics.
        """
        if self._last_step is None:
            return
        decay = self._decay_since_last_touch(self._step)
        for slot in self._slots.values():
            if slot.latent_dim is not None:
                shape = [1] * slot.param.dim()
                shape[slot.latent_dim] = -1
                slot.exp_avg_sq.mul_(decay.to(slot.exp_avg_sq.dtype).view(shape))
        self._last_step.fill_(self._step)

    def state_dict(self) -> dict[str, Tensor]:
        """Flat, safetensors-ready copies of the state (pending decays are kept, not applied):

        `{name}.exp_avg_sq` per parameter, `latent_last_step` [F] int64, `step` int64 scalar, and `beta2`,
        `eps` fp64 scalars so that a load with other hyper-parameters is refused.
        """
        state = {f"{name}.exp_avg_sq": slot.exp_avg_sq.detach().clone() for name, slot in self._slots.items()}
        if self._last_step is not None:
            state["latent_last_step"] = self._last_step.clone()
        state["step"] = torch.tensor(self._step, dtype=torch.int64)
        state["beta2"] = torch.tensor(self.beta2, dtype=torch.float64)
        state["eps"] = torch.tensor(self.eps, dtype=torch.float64)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore a `state_dict` into this optimizer, whose parameters must be registered already."""
        expected = set(self.state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(
                f"optimizer state does not match the registered parameters: missing {missing}, unexpected {extra}"
            )
        for key in ("beta2", "eps"):
            if float(state[key]) != getattr(self, key):
                raise ValueError(
                    f"the state was written with {key}={float(state[key])}, this optimizer has "
                    f"{key}={getattr(self, key)}"
                )
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"step must be non-negative; got {step}")
        if self._last_step is not None:
            last = state["latent_last_step"]
            if last.shape != self._last_step.shape or last.dtype != torch.int64:
                raise ValueError(
                    f"latent_last_step should be int64 of shape {tuple(self._last_step.shape)}; got "
                    f"{last.dtype} {tuple(last.shape)}"
                )
            if bool((last < 0).any()) or bool((last > step).any()):
                raise ValueError(f"latent_last_step must lie in [0, step={step}]")
        for name, slot in self._slots.items():
            v = state[f"{name}.exp_avg_sq"]
            if v.shape != slot.exp_avg_sq.shape or v.dtype != slot.exp_avg_sq.dtype:
                raise ValueError(
                    f"{name}.exp_avg_sq should be {slot.exp_avg_sq.dtype} of shape "
                    f"{tuple(slot.exp_avg_sq.shape)}; got {v.dtype} {tuple(v.shape)}"
                )
        for name, slot in self._slots.items():
            slot.exp_avg_sq.copy_(state[f"{name}.exp_avg_sq"])
        if self._last_step is not None:
            self._last_step.copy_(state["latent_last_step"])
        self._step = step

    def _check(self, grads: Mapping[str, Tensor], touched: Tensor, lr: float | Mapping[str, float]) -> dict[str, float]:
        """Validate one step's inputs (see `step`); return the learning rate per name."""
        if set(grads) != set(self._slots):
            raise ValueError(
                f"step needs one gradient per registered parameter {sorted(self._slots)}; got {sorted(grads)}"
            )
        if isinstance(lr, Mapping):
            if set(lr) != set(self._slots):
                raise ValueError(f"a per-parameter lr needs exactly the names {sorted(self._slots)}; got {sorted(lr)}")
            lrs = {name: float(lr[name]) for name in self._slots}
        else:
            lrs = dict.fromkeys(self._slots, float(lr))
        for name, value in lrs.items():
            if not value >= 0.0:
                raise ValueError(f"lr for {name} must be a non-negative number; got {value}")
        if touched.dim() != 1 or touched.dtype != torch.int64:
            raise ValueError(
                f"touched must be a 1-D int64 tensor of latent ids; got {touched.dtype} of shape {tuple(touched.shape)}"
            )
        num_touched = touched.shape[0]
        for name, slot in self._slots.items():
            grad = grads[name]
            want = list(slot.param.shape)
            if slot.latent_dim is not None:
                want[slot.latent_dim] = num_touched
            if list(grad.shape) != want:
                what = "the full" if slot.latent_dim is None else f"the compact (dim {slot.latent_dim} = T)"
                raise ValueError(
                    f"gradient of {name} has shape {tuple(grad.shape)}; {what} gradient has shape "
                    f"{tuple(want)} for T={num_touched} touched latents"
                )
            if grad.dtype != slot.param.dtype or grad.device != slot.param.device:
                raise ValueError(
                    f"gradient of {name} is {grad.dtype} on {grad.device}; the parameter is "
                    f"{slot.param.dtype} on {slot.param.device}"
                )
        if self._last_step is not None and touched.device != self._last_step.device:
            raise ValueError(f"touched is on {touched.device}; the parameters are on {self._last_step.device}")
        if self.validate and num_touched > 0:
            lo, hi = int(touched.min()), int(touched.max())
            if lo < 0 or hi >= self.num_latents:
                raise ValueError(f"touched ids must lie in [0, {self.num_latents}); got min {lo}, max {hi}")
            if torch.unique(touched).shape[0] != num_touched:
                raise ValueError("touched ids must be distinct: a latent listed twice would be stepped twice")
        return lrs


def _adam_update(
    param: Tensor,
    exp_avg_sq: Tensor,
    grad: Tensor,
    decay: float | Tensor,
    beta2: float,
    bias_correction2_sqrt: float,
    eps: float,
    lr: float,
) -> None:
    """torch's single-tensor Adam update for beta1 = 0 (exp_avg = grad, step_size = lr), in place, with the
    second moment decayed by `decay` (beta2 for a dense parameter, beta2**(k+1) per latent for a lazy one)."""
    exp_avg_sq.mul_(decay).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(grad, denom, value=-lr)
