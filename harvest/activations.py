"""Residual-stream activations at one decoder layer's output, from a forward truncated after that layer.

Shapes: R rows (sequences), T tokens per row, D the model's hidden size.
"""

import torch
from torch import nn

from .lm import decoder_layers


class _StopForward(Exception):
    """Raised by the capture hook to end the forward right after the hooked layer."""


def layer_activations(
    model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Output of decoder layer `layer` (Gemma Scope "layer_L", `blocks.L.hook_resid_post`), [R, T, D].

    Runs the backbone (model.base_model, never the LM head) and stops inside the hook on layer `layer`, so
    no later layer and no final norm runs (RECIPES 6): at layer 12 of 18 this saves a third of the layers
    and the whole 262k-token unembedding.
    """
    captured: list[torch.Tensor] = []

    def capture(module, args, output):
        # New transformers return the hidden states as a tensor, older ones as the first item of a tuple.
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(capture)
    try:
        with torch.inference_mode():
            model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"decoder layer {layer} of {type(model).__name__} did not run in the forward")
    return captured[0]


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
