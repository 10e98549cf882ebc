"""A static feature browser: each latent's max-activating contexts and output-token effects, in one HTML file.

Three passes over held-out token rows (R rows, T tokens, D d_in, F d_sae, k contexts per latent):
1. `top_activations` streams the rows through the LM and the SAE, keeping a running top-k per latent
   (memory O(F * k) plus one batch of dense activations [N, F]) and the fire counts.
2. `quantile_samples` streams the rows again for the shown latents only, keeping a uniform sample of each
   one's firings (bottom-k of random keys), from which contexts at evenly spaced activation quantiles are
   shown beside the top ones.
3. `latent_pages` re-encodes only the rows that hold a shown context, for the shown latents only, to
   colour every token of each context by that latent's activation.
`render_html` turns the pages into one self-contained file (inline CSS and JS, no URL, no server).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from harvest.activations import keep_mask, layer_activations
from kernels import reference
from sae.evaluation.splice import FORWARD_BANDWIDTH, pad_rows


class TopActivations(NamedTuple):
    """The k largest activations of each latent over the kept tokens, and how often each latent fired."""

    values: Tensor  # [F, k] float32, descending; entries <= 0 are not contexts (the latent fired < k times)
    rows: Tensor  # [F, k] int64, index into the token rows; -1 where values is -inf (fewer than k tokens)
    positions: Tensor  # [F, k] int64, token position in the row
    fire_counts: Tensor  # [F] int64, kept tokens on which the latent fired
    tokens: int  # kept tokens seen (special tokens and padding excluded)


class Context(NamedTuple):
    tokens: list[str]  # decoded token text, unescaped, of positions start .. start + len - 1
    activations: list[float]  # the latent's activation on each of those tokens
    centre: int  # index into tokens of the max-activating token
    row: int
    position: int


class LatentPage(NamedTuple):
    index: int
    density: float  # fire count / tokens
    max_activation: float
    contexts: list[Context]
    logit_effects: list[tuple[str, float]]  # (token text, effect), largest first; [] without an unembedding
    samples: list[Context] = []  # firings across the activation distribution, weakest first


def _encode(x: Tensor, weights: dict[str, Tensor], latents: Tensor | None = None) -> Tensor:
    """Dense JumpReLU activations [N, F] (or [N, len(latents)]) of x [N, D], by kernels.reference.encode."""
    W_enc, b_enc, threshold = weights["W_enc"], weights["b_enc"], weights["threshold"]
    if latents is not None:
        W_enc, b_enc, threshold = W_enc[:, latents], b_enc[latents], threshold[latents]
    return reference.encode(x, W_enc, b_enc, weights["b_dec"], threshold, FORWARD_BANDWIDTH).acts


def _batches(
    lm: nn.Module,
    tokenizer,
    layer: int,
    rows: list[list[int]],
    row_ids: list[int],
    weights,
    batch_rows: int,
    latents: Tensor | None = None,
):
    """Yield (row index [N], position [N], acts [N, F']) for the kept tokens of rows[row_ids], batch by batch."""
    device = weights["W_enc"].device
    for i in range(0, len(row_ids), batch_rows):
        ids = row_ids[i : i + batch_rows]
        input_ids, mask = pad_rows([rows[r] for r in ids], tokenizer.pad_token_id or 0, device)
        keep = keep_mask(input_ids, mask, tokenizer, True)
        if not keep.any():
            continue
        x = layer_activations(lm, layer, input_ids, mask)[keep].to(device, torch.float32)
        where = keep.nonzero()
        with torch.no_grad():
            yield torch.tensor(ids, device=device)[where[:, 0]], where[:, 1], _encode(x, weights, latents)


def top_activations(
    lm: nn.Module,
    tokenizer,
    layer: int,
    weights: dict[str, Tensor],
    rows: list[list[int]],
    k: int = 10,
    batch_rows: int = 8,
) -> TopActivations:
    """Each latent's k max-activating kept tokens (special tokens and padding excluded, as in training).

    weights: raw-space JumpReLU weights (W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], threshold [F]), on
    the device to compute on. Each batch's top-k per latent is merged into the running top-k with one more
    torch.topk over the 2k candidates, so memory is O(F * k) whatever the number of rows.
    """
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    weights = {name: t.float() for name, t in weights.items()}
    F, device = weights["W_enc"].shape[1], weights["W_enc"].device
    values = torch.full((F, k), -torch.inf, device=device)
    row_of = torch.full((F, k), -1, dtype=torch.int64, device=device)
    pos_of = torch.full((F, k), -1, dtype=torch.int64, device=device)
    fire_counts = torch.zeros(F, dtype=torch.int64, device=device)
    tokens = 0
    for row_idx, pos, acts in _batches(lm, tokenizer, layer, rows, list(range(len(rows))), weights, batch_rows):
        fire_counts += (acts > 0).sum(0)
        tokens += len(acts)
        v, i = acts.topk(min(k, len(acts)), dim=0)  # [k', F]: this batch's best tokens per latent
        merged, j = torch.cat([values, v.T], 1).topk(k, dim=1)
        row_of = torch.cat([row_of, row_idx[i].T], 1).gather(1, j)
        pos_of = torch.cat([pos_of, pos[i].T], 1).gather(1, j)
        values = merged
    return TopActivations(values.cpu(), row_of.cpu(), pos_of.cpu(), fire_counts.cpu(), tokens)


def select_latents(top: TopActivations, m: int, order: str = "density") -> list[int]:
    """The m latents to show: the m with the highest firing density ("density"), or the first m ("index")."""
    if order == "index":
        return list(range(min(m, len(top.fire_counts))))
    if order == "density":
        return top.fire_counts.argsort(descending=True, stable=True)[:m].tolist()
    raise ValueError(f'order must be "density" or "index", got {order!r}')


def token_text(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token's own text (tokenizer.decode of the single id), unescaped."""
    cache: dict[int, str] = {}
    for t in token_ids:
        if t not in cache:
            cache[t] = tokenizer.decode([t])
    return [cache[t] for t in token_ids]


def logit_effects(
    lm: nn.Module, tokenizer, W_dec: Tensor, latents: list[int], top: int = 10
) -> list[list[tuple[str, float]]]:
    """Direct logit effect of each latent's decoder direction: W_dec[j] @ W_U^T, its `top` largest tokens.

    This skips the final norm (its scale and the normalisation by the residual's RMS) and any logit
    soft-capping: it ranks tokens by what the direction adds to the unembedding's input. [] per latent when
    the model has no output embedding.
    """
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None or not latents:
        return [[] for _ in latents]
    W_U = head.weight  # [V, D]
    with torch.no_grad():
        effects = W_dec[latents].to(W_U.device, torch.float32) @ W_U.float().T  # [M, V]
        v, i = effects.topk(min(top, effects.shape[1]), dim=1)
    return [list(zip(token_text(tokenizer, ids), vals)) for ids, vals in zip(i.tolist(), v.tolist())]


def quantile_samples(
    lm: nn.Module,
    tokenizer,
    layer: int,
    weights: dict[str, Tensor],
    rows: list[list[int]],
    latents: list[int],
    per_latent: int = 5,
    pool: int = 256,
    seed: int = 0,
    batch_rows: int = 8,
) -> list[list[tuple[float, int, int]]]:
    """For each latent, `per_latent` firings (activation, row, position) spread over its activation quantiles.

    A uniform sample of up to `pool` firings per latent is kept while streaming (bottom-k of random keys, so
    memory is O(len(latents) * pool)); the returned firings sit at evenly spaced ranks of that sample sorted by
    activation, from the weakest to the strongest.
    """
    weights = {name: t.float() for name, t in weights.items()}
    device, M = weights["W_enc"].device, len(latents)
    sel = torch.tensor(latents, dtype=torch.int64, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    keys = torch.full((pool, M), torch.inf, device=device)
    vals = torch.zeros((pool, M), device=device)
    where = torch.zeros((pool, M, 2), dtype=torch.int64, device=device)
    for row_idx, pos, acts in _batches(lm, tokenizer, layer, rows, list(range(len(rows))), weights, batch_rows, sel):
        new_keys = torch.rand(acts.shape, generator=generator, device=device).masked_fill(acts <= 0, torch.inf)
        new_where = torch.stack([row_idx, pos], 1)[:, None, :].expand(-1, M, -1)
        keys, order = torch.cat([keys, new_keys]).topk(pool, dim=0, largest=False)
        vals = torch.cat([vals, acts]).gather(0, order)
        where = torch.cat([where, new_where]).gather(0, order[..., None].expand(-1, -1, 2))
    out = []
    for m in range(M):
        fired = keys[:, m].isfinite()
        v, w = vals[fired, m], where[fired, m]
        v, order = v.sort()
        picks = torch.linspace(0, len(v) - 1, min(per_latent, len(v))).round().long() if len(v) else []
        out.append([(float(v[i]), int(w[order[i], 0]), int(w[order[i], 1])) for i in picks])
    return out


def latent_pages(
    lm: nn.Module,
    tokenizer,
    layer: int,
    weights: dict[str, Tensor],
    rows: list[list[int]],
    top: TopActivations,
    latents: list[int],
    context: int = 8,
    batch_rows: int = 8,
    samples_per_latent: int = 5,
) -> list[LatentPage]:
    """Pages of the given latents: their top contexts and a sample across activation quantiles (+-`context`
    tokens each), coloured by activation."""
    weights = {name: t.float() for name, t in weights.items()}
    sel = torch.tensor(latents, dtype=torch.int64)
    samples = (
        quantile_samples(lm, tokenizer, layer, weights, rows, latents, samples_per_latent, batch_rows=batch_rows)
        if samples_per_latent
        else [[] for _ in latents]
    )
    needed = sorted({r for r in top.rows[sel][top.values[sel] > 0].tolist()} | {r for s in samples for _, r, _ in s})
    # Activation of each shown latent at each kept position of each needed row; 0 elsewhere (specials).
    per_row = {r: torch.zeros(len(rows[r]), len(latents)) for r in needed}
    for row_idx, pos, acts in _batches(
        lm, tokenizer, layer, rows, needed, weights, batch_rows, sel.to(weights["W_enc"].device)
    ):
        for r, p, a in zip(row_idx.tolist(), pos.tolist(), acts.cpu()):
            per_row[r][p] = a
    effects = logit_effects(lm, tokenizer, weights["W_dec"], latents)

    def window(col: int, r: int, p: int) -> Context:
        lo, hi = max(0, p - context), min(len(rows[r]), p + context + 1)
        return Context(token_text(tokenizer, rows[r][lo:hi]), per_row[r][lo:hi, col].tolist(), p - lo, r, p)

    pages = []
    for col, j in enumerate(latents):
        contexts = [
            window(col, r, p)
            for value, r, p in zip(top.values[j].tolist(), top.rows[j].tolist(), top.positions[j].tolist())
            if value > 0
        ]
        density = int(top.fire_counts[j]) / max(top.tokens, 1)
        pages.append(
            LatentPage(
                j,
                density,
                max(float(top.values[j, 0]), 0.0),
                contexts,
                effects[col],
                [window(col, r, p) for _, r, p in samples[col]],
            )
        )
    return pages


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
header { position: sticky; top: 0; background: #fff; padding: .5em 0; border-bottom: 1px solid #ccc; }
.latent { border: 1px solid #ddd; border-radius: 6px; padding: .6em 1em; margin: .8em 0; }
.latent h2 { font-size: 1.05em; margin: 0 0 .4em; }
.meta { color: #666; font-weight: normal; font-size: .9em; }
.ctx { font-family: ui-monospace, monospace; font-size: .85em; margin: .15em 0; white-space: pre-wrap; }
.tok { border-radius: 2px; padding: 0 1px; margin-right: 1px; }
.tok.max { outline: 1px solid #c00; }
.act { color: #888; display: inline-block; width: 5em; }
.logits { font-size: .85em; color: #333; margin-top: .4em; }
.logits code { background: #eef; padding: 0 3px; margin-right: .4em; }
.autointerp { background: #f4f8ee; border-left: 3px solid #7a4; padding: .2em .6em; margin: .3em 0; font-size: .9em; }
"""

_JS = """
const list = document.getElementById('latents');
function sortBy(key) {
  const items = Array.from(list.children);
  items.sort((a, b) => key === 'index' ? a.dataset.index - b.dataset.index : b.dataset.density - a.dataset.density);
  items.forEach(el => list.appendChild(el));
}
document.getElementById('sort').addEventListener('change', e => sortBy(e.target.value));
document.getElementById('search').addEventListener('input', e => {
  const q = e.target.value.trim();
  for (const el of list.children) el.style.display = (q === '' || el.dataset.index === q) ? '' : 'none';
});
"""


def _token_html(text: str, activation: float, scale: float, is_max: bool) -> str:
    alpha = 0.0 if scale <= 0 else min(max(activation / scale, 0.0), 1.0)
    shown = text.replace("\n", "\u21b5")
    return (
        f'<span class="tok{" max" if is_max else ""}" style="background: rgba(255, 120, 0, {alpha:.2f})" '
        f'title="{activation:.3f}">{html.escape(shown)}</span>'
    )


def _context_html(c: Context, scale: float) -> str:
    return (
        f'<div class="ctx"><span class="act">{c.activations[c.centre]:.3f}</span>'
        + "".join(_token_html(t, a, scale, i == c.centre) for i, (t, a) in enumerate(zip(c.tokens, c.activations)))
        + "</div>"
    )


def render_html(
    pages: list[LatentPage], title: str = "SAE feature browser", note: str = "", notes: dict[int, str] | None = None
) -> str:
    """One self-contained HTML page: latents sortable by density or index, a search box by latent id; `notes`
    (latent -> text, e.g. autointerp's explanation and score) are shown under their latent's heading."""
    sections = []
    for page in pages:
        explained = (
            f'<div class="autointerp">{html.escape(notes[page.index])}</div>' if notes and page.index in notes else ""
        )
        ctx_html = "".join(_context_html(c, page.max_activation) for c in page.contexts) or (
            '<div class="meta">never fired on these tokens</div>'
        )
        if page.samples:
            ctx_html += '<div class="meta">across the activation distribution, weakest first:</div>' + "".join(
                _context_html(c, page.max_activation) for c in page.samples
            )
        logits = ""
        if page.logit_effects:
            logits = (
                '<div class="logits">direct logit effect (W_dec[j] @ W_U^T, no final norm): '
                + "".join(f"<code>{html.escape(t)}</code>{v:+.2f} " for t, v in page.logit_effects)
                + "</div>"
            )
        sections.append(
            f'<section class="latent" id="latent-{page.index}" data-index="{page.index}" '
            f'data-density="{page.density:.6g}"><h2>latent {page.index} <span class="meta">density '
            f"{page.density:.3%} &middot; max activation {page.max_activation:.3f}</span></h2>"
            f"{explained}{ctx_html}{logits}</section>"
        )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><header><h1>{html.escape(title)}</h1>"
        f'<p class="meta">{html.escape(note)}</p>'
        '<label>sort by <select id="sort"><option value="density">density</option>'
        '<option value="index">index</option></select></label> '
        '<label>latent id <input id="search" type="search" placeholder="e.g. 42"></label></header>'
        f'<main id="latents">{"".join(sections)}</main><script>{_JS}</script></body></html>\n'
    )


def write_browser(
    path: str | Path,
    lm: nn.Module,
    tokenizer,
    layer: int,
    weights: dict[str, Tensor],
    rows: list[list[int]],
    latents: int,
    k: int = 10,
    context: int = 8,
    order: str = "density",
    title: str = "SAE feature browser",
    notes: dict[int, str] | None = None,
) -> Path:
    """Write the browser of `latents` latents (chosen by `order`) of one SAE to `path`; return the path.

    The latents in `notes` (latent -> text shown under its heading) are shown too, after the chosen ones."""
    top = top_activations(lm, tokenizer, layer, weights, rows, k)
    shown = select_latents(top, latents, order)
    shown += [j for j in notes or {} if j not in shown]
    pages = latent_pages(lm, tokenizer, layer, weights, rows, top, shown, context)
    note = (
        f"{top.tokens:,} tokens in {len(rows)} rows (special tokens excluded); top {k} contexts per latent, "
        f"+-{context} tokens; {len(pages)} of {len(top.fire_counts)} latents, by {order}"
        + (" and those autointerp explained." if notes else ".")
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(pages, title, note, notes), encoding="utf-8")
    return path
