"""One explanation per latent, from its highlighted top and quantile contexts."""

from __future__ import annotations

from typing import NamedTuple

from sae.evaluation.autointerp.clients import LMClient
from sae.evaluation.autointerp.contexts import LatentContexts
from sae.evaluation.autointerp.prompts import explain_prompt, read_explanation


class Explanation(NamedTuple):
    text: str  # the one line the scorer reads; "" when the explainer gave none (scored all the same)
    raw: str  # the explainer's whole answer


def explain(client: LMClient, contexts: LatentContexts) -> Explanation:
    """Ask the explainer about the latent's explanation windows (top first, then quantiles)."""
    if not contexts.explain:
        raise ValueError(f"latent {contexts.latent} has no contexts to explain it from (it never fired)")
    raw = client.complete(explain_prompt(contexts.explain))
    return Explanation(read_explanation(raw), raw)
