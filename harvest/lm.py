"""Loading a causal language model for harvesting, and finding its decoder layers."""

import torch
from torch import nn

from .config import OFFLINE_DEFAULT, ModelConfig
from .errors import HarvestError
from .hub import hub_offline, unloadable


def resolve_device(device: str) -> torch.device:
    """ "auto" means CUDA when one is available, else the CPU; asking for CUDA without one is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise HarvestError(f"device {device!r} was requested but CUDA is not available here; use cpu or auto")
    return resolved


def load_lm(cfg: ModelConfig) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) for cfg, in eval mode with gradients off, and check cfg.layer exists."""
    offline = hub_offline()  # before the import, so huggingface_hub reads the switch too
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if cfg.model == OFFLINE_DEFAULT:
        from .offline_model import offline_default_dir

        path = str(offline_default_dir())
    else:
        path = cfg.model
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=offline)
    except (OSError, ValueError) as e:
        raise unloadable(
            "model",
            cfg.model,
            path,
            "config.json",
            offline,
            f'Pass a local model directory (config.json, weights, tokenizer) or model="{OFFLINE_DEFAULT}" for the '
            "bundled Gemma-3 270M.",
        ) from e
    check_layer(cfg, config.get_text_config().num_hidden_layers)
    if config.model_type == "gemma2":
        # Gemma-2 soft-caps attention logits, which SDPA refuses; set eager on the config (RECIPES 6).
        config._attn_implementation = "eager"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
    except (OSError, ValueError) as e:
        raise HarvestError(f"cannot load the tokenizer of model {cfg.model!r}: {e}") from e
    device = resolve_device(cfg.model_device)
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=resolve_dtype(cfg.model_dtype, device), local_files_only=offline
    )
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def resolve_dtype(model_dtype: str, device: torch.device) -> torch.dtype:
    """ "auto" is bfloat16 on CUDA (the H100 recipe) and float32 elsewhere."""
    if model_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, model_dtype)


def check_layer(cfg: ModelConfig, n_layers: int, layers: tuple[int, ...] = ()) -> None:
    """cfg.layer and any other captured layers exist in a model of n_layers decoder layers."""
    for layer in (cfg.layer, *layers):
        if not 0 <= layer < n_layers:
            raise HarvestError(
                f"layer={layer} is out of range: {cfg.model!r} has {n_layers} decoder layers; pass 0..{n_layers - 1}"
            )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers: the first ModuleList as long as the config's layer count.

    That is model.model.layers for Gemma and Llama-like models, transformer.h for GPT-2,
    model.language_model.layers for multimodal wrappers.
    """
    n = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise HarvestError(f"found no ModuleList of {n} decoder layers in {type(model).__name__}")


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))
