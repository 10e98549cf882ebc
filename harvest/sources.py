"""Where example texts come from: the offline presets, local files and hub datasets through `datasets`
(map-style, or streamed), and the medical QA mixture (harvest/medical_qa.py) from the hub or a local mirror.
"""

from __future__ import annotations

import glob
import re
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import ICD10_DATASET, MEDICAL_QA_DATASET, PYDOC_DATASET, DataConfig
from .documents import icd10_documents, pydoc_documents
from .errors import HarvestError
from .hub import hub_offline
from .medical_qa import SOURCES, MedicalQASource

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
"""datasets builder for each local file extension we read."""

_MIRROR_SUFFIXES = (".json", ".jsonl", ".parquet")
"""File types of a local mirror of hub datasets (their nested records do not fit csv or txt)."""

_SPLIT_WORDS = {"train", "test", "validation", "valid", "dev"}
"""Words that mark a mirror file as belonging to one split (e.g. train-00000-of-00001.parquet)."""

_TEXT_SEED = 0x7E47
"""Mixed into the example-order seeds, so they never coincide with the buffer's shuffle seeds."""


def load_texts(cfg: DataConfig) -> Sequence[str] | TextStream:
    """The examples of cfg.dataset: an indexable sequence of strings (not read into memory for datasets),
    or a TextStream when cfg.streaming."""
    if cfg.dataset == ICD10_DATASET:
        return icd10_documents(cfg.context_size)
    if cfg.dataset == PYDOC_DATASET:
        return pydoc_documents(cfg.context_size)
    if cfg.dataset == MEDICAL_QA_DATASET:
        return medical_qa_texts(cfg.data_dir)
    offline = hub_offline()  # before the import: datasets reads the switch once, at import
    import datasets

    files = _local_files(cfg.dataset)
    try:
        if files is not None:
            builder = _BUILDERS[Path(files[0]).suffix]
            ds = datasets.load_dataset(builder, data_files={cfg.split: files}, split=cfg.split, streaming=cfg.streaming)
        else:
            ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split, streaming=cfg.streaming)
    except Exception as e:  # datasets raises many types (ValueError, ConnectionError, arrow errors ...)
        if files is not None:
            raise HarvestError(f"cannot read dataset files {files}: {type(e).__name__}: {e}") from e
        hub = "the Hugging Face hub is offline (HF_HUB_OFFLINE=1)" if offline else "the hub could not provide it"
        raise HarvestError(
            f"cannot load dataset {cfg.dataset!r}: it names no local file or directory and {hub} "
            f"({type(e).__name__}). Pass local file(s) or a directory ({', '.join(sorted(_BUILDERS))}) "
            f'or dataset="{ICD10_DATASET}".'
        ) from e
    if cfg.streaming:
        return TextStream(ds, cfg.text_field, cfg.shuffle_buffer, cfg.dataset)
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


class TextStream:
    """A dataset read as a stream (a datasets IterableDataset): nothing downloaded ahead, no random access,
    no known length. Each epoch is the stream's order shuffled through a seeded buffer of buffer_size examples.
    """

    def __init__(self, dataset, text_field: str, buffer_size: int, name: str):
        self.dataset, self.text_field, self.buffer_size, self.name = dataset, text_field, buffer_size, name
        try:
            first = next(iter(dataset))
        except StopIteration:
            raise HarvestError(f"the dataset {name!r} has no examples: check dataset and split") from None
        except Exception as e:
            raise HarvestError(f"cannot read the stream of dataset {name!r}: {type(e).__name__}: {e}") from e
        if text_field not in first:
            raise HarvestError(
                f"text_field={text_field!r} is not a column of dataset {name!r}; available columns: "
                f"{list(first)}. Set text_field to the one holding the text."
            )
        if not isinstance(first[text_field], str | None):
            raise HarvestError(f"text_field={text_field!r} holds {type(first[text_field]).__name__}, not strings")

    def epoch(self, epoch: int, seed: int, max_examples: int | None = None) -> Iterator[str]:
        """The texts of one epoch in order; max_examples keeps the first N of the stream (in file order), so
        every epoch reshuffles the same N examples."""
        ds = self.dataset if max_examples is None else self.dataset.take(max_examples)
        ds = ds.shuffle(generator=np.random.default_rng([seed, _TEXT_SEED]), buffer_size=self.buffer_size)
        ds.set_epoch(epoch)
        for example in ds:
            yield example[self.text_field] or ""


class FormattedTexts(Sequence):
    """The examples of a map-style dataset, each formatted into a string when it is read."""

    def __init__(self, dataset, format: Callable[[Mapping[str, Any]], str]):
        self.dataset, self.format = dataset, format

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.format(self.dataset[i])


class ConcatTexts(Sequence):
    """Several sequences of strings as one, in order."""

    def __init__(self, parts: Sequence[Sequence[str]]):
        self.parts = list(parts)
        self._ends = np.cumsum([len(p) for p in self.parts]).tolist()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i) + (len(self) if int(i) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} texts")
        part = bisect_right(self._ends, i)
        return self.parts[part][i - (self._ends[part - 1] if part else 0)]


def medical_qa_texts(data_dir: str | None) -> ConcatTexts:
    """The six datasets of harvest.medical_qa.SOURCES, formatted and concatenated (formatted when read)."""
    offline = hub_offline()  # before the import: datasets reads the switch once, at import
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise HarvestError(f"data_dir={data_dir!r} is not a folder: pass the folder holding the local copies")
    return ConcatTexts(
        [FormattedTexts(_medical_qa_part(source, data_dir, offline), source.format) for source in SOURCES]
    )


def _medical_qa_part(source: MedicalQASource, data_dir: str | None, offline: bool):
    """One dataset of the mixture, from data_dir/<folder>/ or the hub, checked by formatting its first example."""
    import datasets

    where = f'{source.repo} ({source.split} split, part of dataset="{MEDICAL_QA_DATASET}")'
    if data_dir is not None:
        files = _mirror_files(Path(data_dir).expanduser() / source.folder, source.split, where)
        try:
            ds = datasets.load_dataset(
                _BUILDERS[Path(files[0]).suffix], data_files={source.split: files}, split=source.split
            )
        except Exception as e:
            raise HarvestError(f"cannot read the local copy of {where}, {files}: {type(e).__name__}: {e}") from e
    else:
        try:
            ds = datasets.load_dataset(source.repo, split=source.split)
        except Exception as e:
            hub = "is offline (HF_HUB_OFFLINE=1)" if offline else "could not provide it"
            raise HarvestError(
                f"cannot load {where}: the Hugging Face hub {hub} ({type(e).__name__}). "
                "Pass --data-dir DIR with a local copy of each dataset in a "
                f"sub-folder named after its repo ({', '.join(s.folder + '/' for s in SOURCES)}) holding "
                "json, jsonl or parquet files."
            ) from e
    if len(ds) == 0:
        raise HarvestError(f"{where} has no examples: check the files of its {source.split} split")
    try:
        source.format(ds[0])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise HarvestError(
            f"{where} does not have the hub's schema ({type(e).__name__}: {e}); its columns are "
            f"{ds.column_names}. See harvest/medical_qa.py for the schema each dataset needs."
        ) from e
    return ds


def _mirror_files(folder: Path, split: str, where: str) -> list[str]:
    """The json/jsonl/parquet files of `split` under folder: those whose path names the split (train.jsonl,
    data/test-00000-of-00001.parquet), or all of them when none names any split."""
    if not folder.is_dir():
        raise HarvestError(f"data_dir has no folder {folder} for {where}: put its json, jsonl or parquet files there")
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix in _MIRROR_SUFFIXES)
    if not files:
        raise HarvestError(f"{folder} holds no json, jsonl or parquet file for {where}")

    def words(f: Path) -> set[str]:
        return set(re.split(r"[^a-z]+", str(f.relative_to(folder).with_suffix("")).lower()))

    chosen = [f for f in files if split in words(f)]
    if not chosen:
        if any(words(f) & _SPLIT_WORDS for f in files):
            raise HarvestError(
                f"{folder} holds no file of the {split} split for {where} (found {[f.name for f in files]}): "
                f"add it, named e.g. {split}.jsonl"
            )
        chosen = files
    if len({f.suffix for f in chosen}) != 1:
        raise HarvestError(f"{folder} mixes file types {sorted({f.suffix for f in chosen})}: keep one type")
    return [str(f) for f in chosen]
