"""Token rows from text: loading the examples, and an infinite, seeded, resumable stream of rows."""

import glob
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .config import ICD10_DATASET, PYDOC_DATASET, DataConfig
from .documents import icd10_documents, pydoc_documents
from .errors import HarvestError
from .hub import hub_offline


_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
"""datasets builder for each local file extension we read."""

_TEXT_SEED = 0x7E47
"""Mixed into the example-order seeds, so they never coincide with the buffer's shuffle seeds."""


def load_texts(cfg: DataConfig) -> Sequence[str]:
    """The examples of cfg.dataset as an indexable sequence of strings (not read into memory for datasets)."""
    if cfg.dataset == ICD10_DATASET:
        return icd10_documents(cfg.context_size)
    if cfg.dataset == PYDOC_DATASET:
        return pydoc_documents(cfg.context_size)
    offline = hub_offline()  # before the import: datasets reads the switch once, at import
    import datasets

    files = _local_files(cfg.dataset)
    try:
        if files is not None:
            builder = _BUILDERS[Path(files[0]).suffix]
            ds = datasets.load_dataset(builder, data_files={cfg.split: files}, split=cfg.split)
        else:
            ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split)
    except Exception as e:  # datasets raises many types (ValueError, ConnectionError, arrow errors ...)
        if files is not None:
            raise HarvestError(f"cannot read dataset files {files}: {type(e).__name__}: {e}") from e
        hub = "the Hugging Face hub is offline (HF_HUB_OFFLINE=1)" if offline else "the hub could not provide it"
        raise HarvestError(
            f"cannot load dataset {cfg.dataset!r}: it names no local file or directory and {hub} "
            f"({type(e).__name__}). Pass local file(s) or a directory ({', '.join(sorted(_BUILDERS))}) "
            f'or dataset="{ICD10_DATASET}".'
        ) from e
    if cfg.text_field not in ds.column_names:
        raise HarvestError(
            f"text_field={cfg.text_field!r} is not a column of dataset {cfg.dataset!r}; "
            f"available columns: {ds.column_names}. Set text_field to the one holding the text."
        )
    dtype = getattr(ds.features[cfg.text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise HarvestError(f"text_field={cfg.text_field!r} holds {ds.features[cfg.text_field]}, not strings")
    return ds[cfg.text_field]


def _local_files(spec: str) -> list[str] | None:
    """Files named by spec (comma-separated files, globs or directories); None when it names a hub dataset."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    local = [p for p in parts if Path(p).expanduser().exists() or glob.has_magic(p) or Path(p).suffix in _BUILDERS]
    if not local:
        return None
    files = []
    for part in parts:
        path = Path(part).expanduser()
        found = (
            sorted(str(f) for f in path.rglob("*") if f.is_file() and f.suffix in _BUILDERS)
            if path.is_dir()
            else sorted(glob.glob(str(path)))
        )
        if not found:
            raise HarvestError(f"dataset {part!r} matches no file: pass existing file(s) or a directory")
        files += found
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) != 1 or not suffixes <= _BUILDERS.keys():
        raise HarvestError(
            f"dataset {spec!r} has files of types {sorted(suffixes)}: pass files of one type among {sorted(_BUILDERS)}"
        )
    return files


class TokenRows:
    """Infinite stream of token rows [BOS, tokens...] of at most context_size tokens, one example per row.

    Examples longer than a row are truncated, never split or concatenated, so BOS is only ever first.
    Epoch 0 visits the examples in a permutation seeded by data_seed, and only its first max_examples are
    used at all; each later epoch e reshuffles those in a permutation seeded by (data_seed, e). The position
    {"epoch", "index"} (index of the next example within the epoch's order) resumes the stream exactly.
    """

    def __init__(self, texts: Sequence[str], tokenizer, context_size: int, data_seed: int = 0,
                 max_examples: int | None = None):
        if len(texts) == 0:
            raise HarvestError("the dataset has no examples: check dataset and split")
        self.texts, self.tokenizer, self.context_size, self.data_seed = texts, tokenizer, context_size, data_seed
        self.prefix = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        self.num_examples = min(len(texts), max_examples or len(texts))
        self.epoch, self.index = 0, 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, position: dict) -> None:
        self.epoch, self.index = int(position["epoch"]), int(position["index"])

    def _order(self) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != self.epoch:
            first = np.random.default_rng([self.data_seed, _TEXT_SEED, 0]).permutation(len(self.texts))
            order = first[: self.num_examples]
            if self.epoch > 0:
                order = order[np.random.default_rng([self.data_seed, _TEXT_SEED, self.epoch]).permutation(len(order))]
            self._order_cache = (self.epoch, order)
        return self._order_cache[1]

    def take(self, n: int) -> list[tuple[list[int], dict]]:
        """The next n rows, each with the stream position just after it."""
        texts, positions = [], []
        for _ in range(n):
            texts.append(self.texts[int(self._order()[self.index])] or "")
            self.index += 1
            if self.index == self.num_examples:
                self.epoch, self.index = self.epoch + 1, 0
            positions.append(self.position())
        # split_special_tokens: a literal "<bos>" in the text stays text, so no BOS ever lands mid-row.
        ids = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True, truncation=True,
                             max_length=self.context_size - len(self.prefix))["input_ids"]
        return [(self.prefix + row, position) for row, position in zip(ids, positions)]
