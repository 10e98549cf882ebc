"""Downstream loss: the LM's next-token loss with an SAE's reconstruction spliced into its residual stream.

Shapes: R rows, T tokens per row, D d_in, V vocabulary, N spliced positions, P predicted positions.

For each batch of token rows the whole causal LM runs four times, each time with the output of decoder
layer `layer` (the activation the SAE was trained on, RECIPES 6) left alone or replaced at the splice
positions (every non-special position by default: BOS/EOS/pad keep their activation, RECIPES 3):

    clean        x                     the reference distribution
    spliced      sae(x)                the reconstruction x_hat
    zero         0                     zero ablation
    mean         mean(x)               mean ablation; mean over the splice positions of the evaluated set
                                       (or passed in)

Loss masking: position t predicts token t + 1 and counts when both are attended and token t + 1 is a real
token, not BOS/EOS/pad (the same rule as the harvester's keep mask, whatever the splice positions). Padding
and special targets are thus never scored. The BOS position's prediction of the first text token is scored
like any other; with special tokens excluded from splicing it is identical in all four runs (its activation
is kept and attention is causal). The one mask is used for all four runs, so the numbers are comparable:

    CE_run      = mean over predicted positions of -log p_run(target)          (nats)
    delta CE    = CE_spliced - CE_clean                                        (the primary number)
    recovered   = (CE_ablate - CE_spliced) / (CE_ablate - CE_clean)            (zero and mean ablation)
    KL          = mean over predicted positions of KL(p_clean || p_spliced)

Memory: each run's logits [R, T, V] (in the model dtype) and float32 log-probabilities [P, V] for two runs
at a time; at V = 256k choose R * T accordingly (e.g. 8 rows of 1024 tokens: 8 GiB per [P, V] float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from harvest.activations import keep_mask, layer_activations
from harvest.lm import decoder_layers
from kernels.reference import Forward, sae_forward
from sae.checkpoint import PARAM_NAMES

Reconstruct = Callable[[Tensor], Tensor]
"""An SAE as splice sees it: raw activations x [N, D] -> x_hat [N, D] (any SAE, any dtype)."""

FORWARD_BANDWIDTH = 1.0
"""sae_forward and encode want a bandwidth; it only shapes the threshold's backward, which evaluation never runs."""


def sae_params(weights: dict[str, Tensor], device: str | torch.device | None = None) -> list[Tensor]:
    """The raw-space JumpReLU weights (`load_sae_weights`) as sae_forward's parameters, float32 on `device`:
    [W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], threshold [F]] (PARAM_NAMES order)."""
    missing = [name for name in PARAM_NAMES if name not in weights]
    if missing:
        raise ValueError(f"SAE weights lack {missing} (found {sorted(weights)}); load them with load_sae_weights")
    return [weights[name].to(device=device, dtype=torch.float32) for name in PARAM_NAMES]


def sae_from_weights(
    weights: dict[str, Tensor],
    device: str | torch.device | None = None,
    on_forward: Callable[[Tensor, Forward], None] | None = None,
) -> Reconstruct:
    """A `Reconstruct` from raw-space JumpReLU weights (`load_sae_weights`), computing in float32.

    x_hat is returned in x's dtype and device. on_forward(x float32 [N, D], Forward) is called on every
    call, e.g. to feed the metrics accumulators from the splice run with no second SAE forward.
    """
    params = sae_params(weights, device)

    def reconstruct(x: Tensor) -> Tensor:
        x32 = x.to(params[0].device, torch.float32)
        out = sae_forward(x32, *params, bandwidth=FORWARD_BANDWIDTH)
        if on_forward is not None:
            on_forward(x32, out)
        return out.x_hat.to(x.device, x.dtype)

    return reconstruct


def pad_rows(rows: list[list[int]], pad_id: int, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Right-pad token rows (e.g. from `TokenRows.take`) into (input_ids, attention_mask), both [R, T] int64."""
    if not rows:
        raise ValueError("no rows to pad")
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], device=device)
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
    return input_ids, attention_mask


def prediction_mask(input_ids: Tensor, attention_mask: Tensor, tokenizer) -> Tensor:
    """Which next-token predictions are scored, bool [R, T - 1]: position t when t is attended and the
    target t + 1 is a real (attended, non-special) token."""
    real = keep_mask(input_ids, attention_mask, tokenizer, exclude_special_tokens=True)
    return attention_mask[:, :-1].bool() & real[:, 1:]


@contextmanager
def spliced(model: nn.Module, layer: int, splice_mask: Tensor, fn: Reconstruct) -> Iterator[None]:
    """Within the block, decoder layer `layer`'s output h [R, T, D] becomes h with h[splice_mask] := fn(h[splice_mask]).

    Positions outside splice_mask [R, T] keep their activation exactly.
    """

    def hook(module, args, output):
        # New transformers return the hidden states as a tensor, older ones as the first item of a tuple.
        hidden = output[0] if isinstance(output, tuple) else output
        x = hidden[splice_mask]
        x_new = fn(x)
        if x_new.shape != x.shape:
            raise ValueError(f"the spliced function returned shape {tuple(x_new.shape)} for input {tuple(x.shape)}")
        new = hidden.clone()
        new[splice_mask] = x_new.to(hidden.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def lm_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The causal LM's logits [R, T, V] (any active `spliced` hook applies)."""
    with torch.inference_mode():
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def activation_mean(
    model: nn.Module,
    tokenizer,
    layer: int,
    batches: Iterable[tuple[Tensor, Tensor]],
    exclude_special_tokens: bool = True,
) -> Tensor:
    """Mean [D] float64 of layer `layer`'s output over the splice positions of (input_ids, attention_mask) batches.

    Runs only up to the layer (`layer_activations`).
    """
    total, count = None, 0
    for input_ids, attention_mask in batches:
        keep = keep_mask(input_ids, attention_mask, tokenizer, exclude_special_tokens)
        acts = layer_activations(model, layer, input_ids, attention_mask)[keep].double()
        total = acts.sum(dim=0) if total is None else total + acts.sum(dim=0)
        count += acts.shape[0]
    if count == 0:
        raise ValueError("the batches hold no position to average: no rows, or only special tokens and padding")
    return total / count


class LossSums(NamedTuple):
    """Per-batch sums over the predicted positions (nats), added up across batches by `DownstreamAccumulator`."""

    tokens: int  # P predicted positions
    spliced_positions: int  # N activations replaced in each non-clean run
    ce_clean: float
    ce_spliced: float
    ce_zero_ablation: float
    ce_mean_ablation: float
    kl: float  # sum of KL(p_clean || p_spliced)


def _log_probs(logits: Tensor, target_mask: Tensor) -> Tensor:
    """Float32 log-probabilities [P, V] of the predicting positions (logits [R, T, V], mask [R, T - 1])."""
    return logits[:, :-1][target_mask].float().log_softmax(dim=-1)


def _ce_sum(log_probs: Tensor, targets: Tensor) -> float:
    return -float(log_probs.gather(1, targets[:, None]).double().sum())


def batch_losses(
    model: nn.Module,
    layer: int,
    input_ids: Tensor,
    attention_mask: Tensor,
    splice_mask: Tensor,
    target_mask: Tensor,
    sae: Reconstruct,
    mean: Tensor,
) -> LossSums:
    """Run the clean, spliced, zero- and mean-ablated LM on one batch and sum their losses.

    splice_mask [R, T]: positions whose activation is replaced; target_mask [R, T - 1]: scored predictions
    (`prediction_mask`); mean [D]: the mean-ablation activation.
    """
    targets = input_ids[:, 1:][target_mask]
    clean = _log_probs(lm_logits(model, input_ids, attention_mask), target_mask)

    def run(fn: Reconstruct) -> Tensor:
        with spliced(model, layer, splice_mask, fn):
            return _log_probs(lm_logits(model, input_ids, attention_mask), target_mask)

    out = run(sae)
    kl = float((clean.exp() * (clean - out)).sum(dim=-1).double().sum())
    ce_spliced = _ce_sum(out, targets)
    del out
    ce_zero = _ce_sum(run(torch.zeros_like), targets)
    ce_mean = _ce_sum(run(lambda x: mean.to(x).expand_as(x)), targets)
    return LossSums(
        tokens=int(target_mask.sum()),
        spliced_positions=int(splice_mask.sum()),
        ce_clean=_ce_sum(clean, targets),
        ce_spliced=ce_spliced,
        ce_zero_ablation=ce_zero,
        ce_mean_ablation=ce_mean,
        kl=kl,
    )


class DownstreamLoss(NamedTuple):
    """Downstream loss over P predicted positions (see the module docstring); losses in nats per token."""

    tokens: int  # P predicted (scored) positions
    spliced_positions: int  # activations replaced in each non-clean run
    ce_clean: float
    ce_spliced: float
    ce_zero_ablation: float
    ce_mean_ablation: float
    delta_ce: float  # ce_spliced - ce_clean
    loss_recovered_zero: float  # (ce_zero_ablation - ce_spliced) / (ce_zero_ablation - ce_clean)
    loss_recovered_mean: float  # (ce_mean_ablation - ce_spliced) / (ce_mean_ablation - ce_clean)
    kl: float  # mean KL(p_clean || p_spliced) per predicted position


def _recovered(ablate: float, spliced_ce: float, clean: float) -> float:
    return (ablate - spliced_ce) / (ablate - clean) if ablate != clean else math.nan


class DownstreamAccumulator:
    """Adds `LossSums` of many batches; `result()` gives the token-weighted means."""

    def __init__(self) -> None:
        self.sums = LossSums(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)

    def update(self, sums: LossSums) -> None:
        self.sums = LossSums(*(a + b for a, b in zip(self.sums, sums)))

    def result(self) -> DownstreamLoss:
        s = self.sums
        if s.tokens == 0:
            raise ValueError("no predicted position was scored: the rows hold no real target token")
        clean, spliced_ce = s.ce_clean / s.tokens, s.ce_spliced / s.tokens
        zero, mean = s.ce_zero_ablation / s.tokens, s.ce_mean_ablation / s.tokens
        return DownstreamLoss(
            tokens=s.tokens,
            spliced_positions=s.spliced_positions,
            ce_clean=clean,
            ce_spliced=spliced_ce,
            ce_zero_ablation=zero,
            ce_mean_ablation=mean,
            delta_ce=spliced_ce - clean,
            loss_recovered_zero=_recovered(zero, spliced_ce, clean),
            loss_recovered_mean=_recovered(mean, spliced_ce, clean),
            kl=s.kl / s.tokens,
        )


def downstream_loss(
    model: nn.Module,
    tokenizer,
    layer: int,
    batches: Iterable[tuple[Tensor, Tensor]],
    sae: Reconstruct,
    mean: Tensor | None = None,
    exclude_special_tokens: bool = True,
) -> DownstreamLoss:
    """Downstream loss of `sae` spliced at decoder layer `layer` over (input_ids, attention_mask) batches [R, T].

    mean: the mean-ablation activation [D]; None computes it over the batches' splice positions first
    (`activation_mean`, a second pass truncated at the layer), so `batches` must then be re-iterable
    (a list, not a generator). exclude_special_tokens=False also splices BOS/EOS (the Salmon setup);
    padding is never spliced, and the scored positions do not depend on this flag.
    """
    if mean is None:
        if iter(batches) is batches:
            raise ValueError("batches is a one-shot iterator: pass a list (it is read twice) or pass mean")
        mean = activation_mean(model, tokenizer, layer, batches, exclude_special_tokens)
    acc = DownstreamAccumulator()
    for input_ids, attention_mask in batches:
        splice_mask = keep_mask(input_ids, attention_mask, tokenizer, exclude_special_tokens)
        target_mask = prediction_mask(input_ids, attention_mask, tokenizer)
        acc.update(batch_losses(model, layer, input_ids, attention_mask, splice_mask, target_mask, sae, mean))
    return acc.result()
