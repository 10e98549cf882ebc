"""The explainer's and the scorer's prompts, and how their answers are read.

Contexts reach the explainer with every token on which the latent fires wrapped in <<...>> (a run of firing
tokens in one pair, leading spaces left outside); the scorer sees plain text only, so it must decide from
the explanation alone. Both prompts end with a cue ("Description:", "Answer:") so that a base model without a
chat template (the offline Gemma-3 270M) continues with an answer rather than more instructions.
"""

from __future__ import annotations

from sae.evaluation.autointerp.contexts import Window

MAX_EXPLANATION_CHARS = 200
"""Longer explanations are cut: the scorer's prompt should hold a description, not an essay."""


def plain(window: Window) -> str:
    """The window's text, newlines as spaces."""
    return "".join(window.tokens).replace("\n", " ").strip()


def highlighted(window: Window) -> str:
    """The window's text with each run of firing tokens wrapped in <<...>>, e.g. "acute <<chest pain>> radiating"."""
    out, inside = [], False
    for text, act in zip(window.tokens, window.activations):
        text = text.replace("\n", " ")
        if act > 0 and not inside:
            stripped = text.lstrip()
            out.append(text[: len(text) - len(stripped)] + "<<" + stripped)
            inside = True
        elif act <= 0 and inside:
            out.append(">>" + text)
            inside = False
        else:
            out.append(text)
    return ("".join(out) + (">>" if inside else "")).strip()


def explain_prompt(windows: list[Window]) -> str:
    examples = "\n".join(f"Example {i + 1}: {highlighted(w)}" for i, w in enumerate(windows))
    return (
        "We are studying a feature of a language model. It is active on some tokens of the text excerpts below; "
        "the tokens where it is active are marked <<like this>>. The first examples are where it is most "
        "active, the last ones where it is weakly active.\n\n"
        f"{examples}\n\n"
        "In one short line, describe what the feature detects (the words, topic or pattern the marked tokens "
        "share). Answer with the description only.\n"
        "Description:"
    )


_DECORATION = "\"'*`-: "
"""Quotes, markdown emphasis, bullets and spaces around an explanation."""


def read_explanation(answer: str) -> str:
    """The first non-empty line, without an "Explanation:"-style prefix or quotes, cut at MAX_EXPLANATION_CHARS;
    "" when the answer is blank."""
    line = next((s.strip() for s in answer.splitlines() if s.strip()), "")
    for prefix in ("explanation:", "description:", "the feature detects", "this feature detects"):
        line = line.strip(_DECORATION)
        if line.lower().startswith(prefix):
            line = line[len(prefix) :]
    return line.strip(_DECORATION)[:MAX_EXPLANATION_CHARS]


def score_prompt(explanation: str, text: str) -> str:
    return (
        f"A feature of a language model is described as: {explanation}\n\n"
        f"Text: {text}\n\n"
        "Is this feature active on any token of the text? Answer with one word: yes or no.\n"
        "Answer:"
    )
