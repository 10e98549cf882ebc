"""Detection scoring: the scorer LM says, for each held-out context, whether the explained latent fires on it;
against the truth (half the contexts activate the latent, half do not) that gives accuracy, precision, recall and
F1 per latent. An answer that is neither yes nor no is malformed: it is counted, and scored as wrong (a "no" on an
activating context, a "yes" on a non-activating one), so a scorer that babbles cannot score well by abstaining.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_YES = re.compile(r"^\W*(yes|y|true|1)\b", re.IGNORECASE)
_NO = re.compile(r"^\W*(no|n|false|0)\b", re.IGNORECASE)


def parse_answer(answer: str) -> bool | None:
    """True for yes, False for no, None for anything else (malformed)."""
    if _YES.match(answer):
        return True
    if _NO.match(answer):
        return False
    return None


class Detection(NamedTuple):
    accuracy: float
    precision: float
    recall: float
    f1: float
    malformed: int
    n: int


def detection_scores(answers: list[str], truth: list[bool]) -> Detection:
    """The metrics of the scorer's `answers` against `truth` (whether each context activates the latent)."""
    if len(answers) != len(truth) or not truth:
        raise ValueError(f"{len(answers)} answers for {len(truth)} contexts: one answer per context, at least one")
    said = [parse_answer(a) for a in answers]
    malformed = sum(s is None for s in said)
    predicted = [(not t) if s is None else s for s, t in zip(said, truth)]  # malformed: scored as wrong
    tp = sum(p and t for p, t in zip(predicted, truth))
    fp = sum(p and not t for p, t in zip(predicted, truth))
    fn = sum((not p) and t for p, t in zip(predicted, truth))
    correct = sum(p == t for p, t in zip(predicted, truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Detection(correct / len(truth), precision, recall, f1, malformed, len(truth))
