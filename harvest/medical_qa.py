"""The medical QA mixture of the Salmon experiment (arXiv 2508.09363): six openlifescienceai hub datasets.

Each example becomes one text: the question, "The options are:" with one option a line ("A. ..."),
"Correct option:" with the answer's letter and text, then the explanation or long answer where the dataset
has one. The formatters are pure functions of one example dict, in the schemas the hub serves:

- medqa, mmlu_college_medicine, mmlu_clinical_knowledge, mmlu_professional_medicine:
  {"id", "data": {"Question", "Options": {"A".."D"}, "Correct Answer", "Correct Option"}, "subject_name"}
- pubmedqa: {"id", "data": {"Context": [str], "Question", "Options", "Correct Answer", "Long Answer", ...}}
- medmcqa: {"id", "question", "opa", "opb", "opc", "opd", "cop" (0-based), "choice_type", "exp" (or None),
  "subject_name", "topic_name"}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

LETTERS = "ABCDEFGHIJ"


class MedicalQASource(NamedTuple):
    repo: str
    """Hub dataset id, e.g. openlifescienceai/medqa; a local mirror names its sub-folder after the last part."""
    split: str
    """The split the mixture uses."""
    format: Callable[[Mapping[str, Any]], str]
    """One example dict -> its text."""

    @property
    def folder(self) -> str:
        """Sub-folder of data_dir holding the local copy."""
        return self.repo.split("/")[-1]


def format_question(
    question: str,
    options: Mapping[str, str],
    answer: str,
    explanation: str | None = None,
    explanation_label: str = "Explanation",
) -> str:
    """The shared layout; options maps letters to option texts in order, answer is "B. text"."""
    lines = [question.strip(), "The options are:"]
    lines += [f"{letter}. {text.strip()}" for letter, text in options.items()]
    lines.append(f"Correct option: {answer}")
    if explanation and explanation.strip():
        lines.append(f"{explanation_label}: {explanation.strip()}")
    return "\n".join(lines)


def _options(raw: Mapping[str, str | None]) -> dict[str, str]:
    """Letter -> text in letter order; a parquet struct may carry None for letters a question lacks."""
    return {letter: str(raw[letter]) for letter in sorted(raw) if raw[letter] is not None}


def _answer(options: Mapping[str, str], letter: str | None, text: str | None) -> str:
    """ "B. text" from the correct letter, or from the correct text when the letter is missing or unknown."""
    if letter in options:
        return f"{letter}. {options[letter].strip()}"
    for key, value in options.items():
        if text is not None and value.strip() == str(text).strip():
            return f"{key}. {value.strip()}"
    return str(text or "").strip()


def format_mcq(example: Mapping[str, Any]) -> str:
    """medqa and the three mmlu datasets: a nested "data" record with lettered options, no explanation."""
    data = example["data"]
    options = _options(data["Options"])
    return format_question(
        data["Question"], options, _answer(options, data.get("Correct Option"), data.get("Correct Answer"))
    )


def format_pubmedqa(example: Mapping[str, Any]) -> str:
    """pubmedqa: the abstract (without its conclusion) before the question, the conclusion as the long answer."""
    data = example["data"]
    options = _options(data["Options"])
    context = data.get("Context") or []
    context = [context] if isinstance(context, str) else list(context)
    question = "\n".join([*(c.strip() for c in context if c and c.strip()), data["Question"].strip()])
    answer = _answer(options, data.get("Correct Option"), data.get("Correct Answer"))
    return format_question(question, options, answer, data.get("Long Answer"), explanation_label="Long answer")


def format_medmcqa(example: Mapping[str, Any]) -> str:
    """medmcqa: flat columns opa..opd, a 0-based correct index cop, and an explanation exp (often None)."""
    options = {letter: str(example[key]) for letter, key in zip(LETTERS, ("opa", "opb", "opc", "opd"))}
    answer = _answer(options, LETTERS[int(example["cop"])], None)
    return format_question(example["question"], options, answer, example.get("exp"))


SOURCES: tuple[MedicalQASource, ...] = (
    MedicalQASource("openlifescienceai/medqa", "train", format_mcq),
    MedicalQASource("openlifescienceai/medmcqa", "train", format_medmcqa),
    MedicalQASource("openlifescienceai/pubmedqa", "train", format_pubmedqa),
    MedicalQASource("openlifescienceai/mmlu_college_medicine", "test", format_mcq),
    MedicalQASource("openlifescienceai/mmlu_clinical_knowledge", "test", format_mcq),
    MedicalQASource("openlifescienceai/mmlu_professional_medicine", "test", format_mcq),
)
"""The mixture, in concatenation order (TokenRows' seeded permutation then orders the examples)."""
