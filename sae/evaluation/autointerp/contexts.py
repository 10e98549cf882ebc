"""The contexts a latent is explained from and scored on (R rows, T tokens per row, M chosen latents).

For each latent the rows are split so that no row serves twice. The explainer sees the windows around the
maxima of its `n_top` strongest rows (at most half of the rows it fires in: the feature browser's top
contexts) and of `n_quantile` rows at evenly spaced ranks of the rest (its quantile contexts, weakest first).
The scorer sees held-out windows from other rows: activating ones centred on a random firing of a randomly
drawn row, and as many non-activating ones (windows in which the latent is zero on every token). Draws are
seeded by (seed, latent), so the same activations give the same contexts.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.functional import max_pool1d

from sae.errors import ConfigError
from sae.evaluation.browser import _batches, token_text


class Window(NamedTuple):
    tokens: list[str]  # decoded token text of row[lo:hi]
    activations: list[float]  # the latent's activation on each of those tokens (0 on special tokens)
    row: int
    position: int  # the token the window is centred on


class LatentContexts(NamedTuple):
    latent: int
    fire_count: int  # firing tokens in all rows
    explain: list[Window]  # top windows (strongest first), then quantile windows (weakest first)
    held_out: list[tuple[Window, bool]]  # shuffled; True = activating; as many of each; rows disjoint from explain


def fire_counts(lm: nn.Module, tokenizer, layer: int, weights: dict[str, Tensor], rows: list[list[int]]) -> Tensor:
    """[F] int64: on how many kept tokens of `rows` each latent fires."""
    weights = {name: t.float() for name, t in weights.items()}
    counts = torch.zeros(weights["W_enc"].shape[1], dtype=torch.int64, device=weights["W_enc"].device)
    for _, _, acts in _batches(lm, tokenizer, layer, rows, list(range(len(rows))), weights, 8):
        counts += (acts > 0).sum(0)
    return counts.cpu()


def sample_latents(counts: Tensor, n: int, seed: int = 0) -> list[int]:
    """n latents drawn uniformly (seeded) from those that fire at least once, ascending; all of them if fewer fire.

    Asking for more latents than the SAE has is a ConfigError.
    """
    F = len(counts)
    if n < 1 or n > F:
        raise ConfigError(f"--autointerp-latents {n}: the SAE has {F} latents; ask for 1 to {F}")
    alive = counts.gt(0).nonzero().flatten().tolist()
    return sorted(random.Random(seed).sample(alive, min(n, len(alive))))


def dense_activations(
    lm: nn.Module,
    tokenizer,
    layer: int,
    weights: dict[str, Tensor],
    rows: list[list[int]],
    latents: list[int],
    batch_rows: int = 8,
) -> list[Tensor]:
    """Per row, [T, M] activations of the chosen latents on every token (0 on special tokens and padding)."""
    weights = {name: t.float() for name, t in weights.items()}
    sel = torch.tensor(latents, dtype=torch.int64, device=weights["W_enc"].device)
    out = [torch.zeros(len(row), len(latents)) for row in rows]
    ids = list(range(len(rows)))
    for row_idx, pos, acts in _batches(lm, tokenizer, layer, rows, ids, weights, batch_rows, sel):
        for r, p, a in zip(row_idx.tolist(), pos.tolist(), acts.cpu()):
            out[r][p] = a
    return out


def _window(texts: list[str], acts: Tensor, r: int, p: int, context: int) -> Window:
    lo, hi = max(0, p - context), min(len(texts), p + context + 1)
    return Window(texts[lo:hi], acts[lo:hi].tolist(), r, p)


def latent_contexts(
    acts: list[Tensor],
    texts: list[list[str]],
    latents: list[int],
    n_top: int = 10,
    n_quantile: int = 5,
    n_score: int = 10,
    context: int = 8,
    seed: int = 0,
) -> list[LatentContexts]:
    """Explanation and held-out windows (+-`context` tokens) of each latent, from its activations per row.

    acts: per row [T, M], column m for latents[m]; texts: per row, each token's text. At most `n_score`
    activating and as many non-activating held-out windows: fewer when either kind runs out of rows.
    """
    if min(n_top, n_score) < 1 or n_quantile < 0 or context < 0:
        raise ValueError(f"n_top={n_top} and n_score={n_score} must be >= 1, n_quantile and context >= 0")
    out = []
    for m, latent in enumerate(latents):
        rng = random.Random(f"{seed}-{latent}")
        col = [a[:, m] for a in acts]
        peak = torch.tensor([float(c.max()) if len(c) else 0.0 for c in col])
        firing = [r for r in peak.argsort(descending=True, stable=True).tolist() if peak[r] > 0]
        cut = min(n_top, max(1, len(firing) // 2))  # at most half the firing rows: the rest can be held out
        top, rest = firing[:cut], firing[cut:]
        rng.shuffle(rest)
        # Non-activating centres: no firing within +-context, i.e. the max-pooled firing mask is 0.
        quiet = {}
        for r in range(len(col)):
            if r in top or not len(col[r]):
                continue
            pooled = max_pool1d(col[r].gt(0).float()[None, None], 2 * context + 1, 1, context)[0, 0]
            centres = pooled.eq(0).nonzero().flatten().tolist()
            if centres:
                quiet[r] = centres
        # Held-out rows first (scoring needs both kinds, balanced), then quantile rows from what is left.
        negatives = [r for r in quiet if r not in rest[:n_score]]
        rng.shuffle(negatives)
        n = min(n_score, len(rest), len(negatives))
        positive, negatives = rest[:n], negatives[:n]
        used = set(positive) | set(negatives)
        remaining = sorted((r for r in rest if r not in used), key=lambda r: float(peak[r]))
        picks = torch.linspace(0, len(remaining) - 1, min(n_quantile, len(remaining))).round().long().tolist()
        quantile = [remaining[i] for i in picks] if remaining else []

        explain = [_window(texts[r], col[r], r, int(col[r].argmax()), context) for r in top + quantile]
        fired = {r: col[r].gt(0).nonzero().flatten().tolist() for r in positive}
        held_out = [(_window(texts[r], col[r], r, rng.choice(fired[r]), context), True) for r in positive]
        held_out += [(_window(texts[r], col[r], r, rng.choice(quiet[r]), context), False) for r in negatives]
        rng.shuffle(held_out)
        out.append(LatentContexts(latent, int(sum(int(c.gt(0).sum()) for c in col)), explain, held_out))
    return out


def row_texts(tokenizer, rows: list[list[int]]) -> list[list[str]]:
    """Each row's token texts (sae.evaluation.browser.token_text)."""
    return [token_text(tokenizer, row) for row in rows]
