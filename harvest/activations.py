"""Residual-stream activations at one decoder layer's output, from a forward truncated after that layer.

Shapes: R rows (sequences), T tokens per row, L captured layers, D the model's hidden size.
"""

from collections.abc import Sequence

import torch
from torch import nn

from .lm import decoder_layers


class _StopForward(Exception):
    """Raised by the capture hook to end the forward right after the hooked layer."""


def layer_activations(
    model: nn.Module, layer: int | Sequence[int], input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Output of decoder layer `layer` (Gemma Scope "layer_L", `blocks.L.hook_resid_post`), [R, T, D].

    With a sequence of layers, all of them from one forward: [R, T, L, D] in the order given.

    Runs the backbone (model.base_model, never the LM head) and stops inside the hook on the deepest layer
    asked for, so no later layer and no final norm runs (RECIPES 6): at layer 12 of 18 this saves a third of
    the layers and the whole 262k-token unembedding.
    """
    layers = [layer] if isinstance(layer, int) else list(layer)
    if not layers:
        raise ValueError("layer_activations needs at least one layer")
    deepest = max(layers)
    captured: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def capture(module, args, output):
            # New transformers return the hidden states as a tensor, older ones as the first item of a tuple.
            captured[index] = output[0] if isinstance(output, tuple) else output
            if index == deepest:
                raise _StopForward

        return capture

    modules = decoder_layers(model)
    handles = [modules[i].register_forward_hook(hook(i)) for i in sorted(set(layers))]
    try:
        with torch.inference_mode():
            model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if deepest not in captured:
        raise RuntimeError(f"decoder layer {deepest} of {type(model).__name__} did not run in the forward")
    if isinstance(layer, int):
        return captured[layer]
    return torch.stack([captured[i] for i in layers], dim=2)


def keep_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer, exclude_special_tokens: bool
) -> torch.Tensor:
    """Which positions to harvest, bool [R, T]: never padding; no special token (BOS, EOS, pad) when excluding.

    Gemma's BOS position has ~7x the norm of the others (RECIPES 7) and would dominate an SAE's loss.
    """
    keep = attention_mask.bool()
    if exclude_special_tokens:
        special = torch.tensor(sorted(tokenizer.all_special_ids), device=input_ids.device)
        keep &= ~torch.isin(input_ids, special)
    return keep


def norm_outliers(acts: torch.Tensor, factor: float) -> torch.Tensor:
    """Which tokens of acts [N, L, D] to drop, bool [N]: the norm at any layer is above factor x that layer's
    median norm over these N tokens (one forward batch). Such tokens (attention sinks, BOS-like positions)
    can dominate an SAE's squared-error loss."""
    norms = acts.float().norm(dim=-1)  # [N, L]
    return (norms > factor * norms.median(dim=0).values).any(dim=1)
