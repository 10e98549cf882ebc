"""`run_autointerp`: explain each latent, score the explanation on its held-out contexts, and score a random
explanation beside it as a floor.

The floor: every latent is also scored with ANOTHER latent's explanation, on its own held-out contexts. The
explained latents are shuffled once (random.Random(seed)) and each takes the explanation of the next one in
that order (the last takes the first's), so no latent gets its own and every explanation is used once. An
explanation that does no better than the floor says nothing specific about its latent.
"""

from __future__ import annotations

import random
import statistics
import warnings
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from sae.errors import ConfigError
from sae.evaluation.autointerp.cache import CachedClient
from sae.evaluation.autointerp.clients import HttpClient, LMClient
from sae.evaluation.autointerp.contexts import (
    LatentContexts,
    dense_activations,
    fire_counts,
    latent_contexts,
    row_texts,
    sample_latents,
)
from sae.evaluation.autointerp.explain import explain
from sae.evaluation.autointerp.prompts import plain, score_prompt
from sae.evaluation.autointerp.score import detection_scores

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def distribution(values: list[float]) -> dict[str, Any]:
    """n, mean, median and QUANTILES (linear interpolation) of values; None entries when there are none."""
    if not values:
        return {"n": 0, "mean": None, "median": None, "quantiles": {str(q): None for q in QUANTILES}}
    s = sorted(values)

    def at(q: float) -> float:
        i = q * (len(s) - 1)
        lo = int(i)
        return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (i - lo)

    return {
        "n": len(s),
        "mean": statistics.fmean(s),
        "median": at(0.5),
        "quantiles": {str(q): at(q) for q in QUANTILES},
    }


def floor_donors(latents: list[int], seed: int = 0) -> dict[int, int]:
    """latent -> the latent whose explanation it is scored with for the floor (never itself; {} under 2)."""
    if len(latents) < 2:
        return {}
    order = list(latents)
    random.Random(seed).shuffle(order)
    return {a: b for a, b in zip(order, order[1:] + order[:1])}


def _score(client: LMClient, explanation: str, held_out, bar) -> dict[str, Any]:
    answers = []
    for window, _ in held_out:
        answers.append(client.complete(score_prompt(explanation, plain(window))))
        bar.update(1)
    return detection_scores(answers, [truth for _, truth in held_out])._asdict()


def run_autointerp(
    contexts: list[LatentContexts], client: LMClient, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Explain and score each latent; {"latents": [one record per latent], "summary": {...}}.

    A record holds the explanation, its detection scores ("detection": accuracy, precision, recall, f1,
    malformed, n) and the floor's ("floor", with "floor_from": the donor latent); "detection" is None
    with a "skipped" reason when the latent has no balanced held-out set. The summary gives the distribution
    (mean, median, quantiles) of F1 and accuracy over the scored latents, for the explanations and the floor.
    """
    explainable = [c for c in contexts if c.explain]
    scored = [c for c in explainable if c.held_out]
    donors = floor_donors([c.latent for c in explainable], seed)
    total = len(explainable) + sum(len(c.held_out) * (1 + (c.latent in donors)) for c in scored)
    records, explanations = [], {}
    with tqdm(total=total, desc="autointerp", unit="prompt", disable=not progress) as bar:
        for c in explainable:
            explanations[c.latent] = explain(client, c)
            bar.update(1)
        for c in contexts:
            record: dict[str, Any] = {
                "latent": c.latent,
                "fire_count": c.fire_count,
                "explain_contexts": len(c.explain),
                "held_out_contexts": len(c.held_out),
                "explanation": explanations[c.latent].text if c.latent in explanations else None,
                "detection": None,
                "floor": None,
                "floor_from": donors.get(c.latent),
            }
            if c.latent not in explanations:
                record["skipped"] = "never fired on these rows"
            elif not c.held_out:
                record["skipped"] = "no balanced held-out set (too few rows with, or without, a firing)"
            else:
                record["detection"] = _score(client, record["explanation"], c.held_out, bar)
                if c.latent in donors:
                    record["floor"] = _score(client, explanations[donors[c.latent]].text, c.held_out, bar)
            records.append(record)
    done = [r for r in records if r["detection"] is not None]
    floored = [r for r in done if r["floor"] is not None]
    summary = {
        "latents": len(records),
        "explained": len(explanations),
        "scored": len(done),
        "empty_explanations": sum(1 for e in explanations.values() if not e.text),
        "malformed_answers": sum(r["detection"]["malformed"] for r in done),
        "floor_malformed_answers": sum(r["floor"]["malformed"] for r in floored),
        "f1": distribution([r["detection"]["f1"] for r in done]),
        "accuracy": distribution([r["detection"]["accuracy"] for r in done]),
        "floor_f1": distribution([r["floor"]["f1"] for r in floored]),
        "floor_accuracy": distribution([r["floor"]["accuracy"] for r in floored]),
        "floor": "each latent scored with another latent's explanation (a seeded shuffle, each taking the next's)",
        "malformed": "answers neither yes nor no, scored as wrong",
    }
    return {"latents": records, "summary": summary}


def autointerp_sae(
    lm: nn.Module,
    tokenizer,
    layer: int,
    weights: dict[str, Tensor],
    rows: list[list[int]],
    client: LMClient,
    latents: int,
    seed: int = 0,
    context: int = 8,
    n_top: int = 10,
    n_quantile: int = 5,
    n_score: int = 10,
    progress: bool = True,
) -> dict[str, Any]:
    """Autointerp of `latents` latents of one SAE, drawn (seeded) from those that fire on `rows`.

    weights: raw-space JumpReLU weights on the device to compute on. The result is run_autointerp's, with
    "sampled" (the latents), "firing" (how many latents fired on the rows) and "requested" in the summary.
    """
    counts = fire_counts(lm, tokenizer, layer, weights, rows)
    chosen = sample_latents(counts, latents, seed)
    acts = dense_activations(lm, tokenizer, layer, weights, rows, chosen)
    contexts = latent_contexts(acts, row_texts(tokenizer, rows), chosen, n_top, n_quantile, n_score, context, seed)
    result = run_autointerp(contexts, client, seed, progress)
    result["summary"] |= {"requested": latents, "firing": int(counts.gt(0).sum()), "sampled": chosen}
    return result


def eval_client(
    endpoint: str | None, model: str | None, timeout_s: float, device: str, cache: str | Path, retries: int = 3
) -> CachedClient:
    """The explainer/scorer of `python -m sae eval`: the endpoint's `model` over HTTP, else a local transformers
    model (default the offline Gemma-3 270M), behind the answer cache at `cache`."""
    if endpoint:
        if not model:
            raise ConfigError(
                "--autointerp-endpoint needs --autointerp-model: the name the server serves the model under "
                "(vLLM: the --served-model-name or path; Ollama: e.g. llama3.2)"
            )
        client = HttpClient(endpoint, model, timeout_s=timeout_s, retries=retries)
        served = client.check()
        if served is not None and model not in served:
            warnings.warn(
                f"{endpoint} lists the models {served}, not {model!r}; if its requests fail, pass one of those to "
                "--autointerp-model",
                stacklevel=2,
            )
    else:
        from sae.evaluation.autointerp.clients import TransformersClient

        client = TransformersClient(model or "offline-default", device="cpu" if device == "auto" else device)
    return CachedClient(client, cache)
