"""Eval figures (sae.evaluation.plots) and the static feature browser (sae.evaluation.browser), on hand-made
reports and the tiny random Gemma-2."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from harvest import DataConfig, ModelConfig, load_lm
from harvest.activations import keep_mask, layer_activations
from harvest.text import TokenRows, load_texts
from kernels import reference
from sae.__main__ import main
from sae.evaluation.browser import (
    Context,
    LatentPage,
    latent_pages,
    quantile_samples,
    render_html,
    select_latents,
    top_activations,
    write_browser,
)
from sae.evaluation.plots import FIGURES, write_plots
from sae.evaluation.splice import pad_rows

LAYER = 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sae_result(l0: float, ev: float, dead: int, delta_ce: float | None = None) -> dict:
    edges = np.linspace(-3, 0, 11).tolist()
    result = {
        "reconstruction": {"explained_variance": ev, "fvu": 1 - ev},
        "sparsity": {"mean_l0": l0, "dead_fraction": 0.1},
        "density_histogram": {"edges": edges, "counts": [0, 1, 3, 5, 8, 6, 4, 2, 1, 0], "dead": dead},
    }
    if delta_ce is not None:
        result["downstream"] = {"delta_ce": delta_ce}
    return result


def test_write_plots_writes_valid_pngs(tmp_path):
    report = {
        "heldout": {"tokens": 1000},
        "saes": {"runs/a": _sae_result(12.0, 0.81, 3, 0.12), "runs/b/params.npz": _sae_result(40.0, 0.9, 0, 0.05)},
    }
    for r in report["saes"].values():  # the interpretability sections, as report.json holds them (keys as text)
        r["sparse_probing"] = {"task": "icd10-chapters", "k": {"1": 0.4, "2": 0.5, "5": 0.7}, "dense": 0.9}
        worst = {"accuracy": 0.6, "worst_group": 0.2}
        after = {"accuracy": 0.7, "worst_group": 0.6}
        r["concept_removal"] = {"task": "icd10-encounter", "n_latents": 5, "before": worst, "after": after,
                                "random": worst, "after_fixed_probe": after, "random_fixed_probe": worst}  # fmt: skip
        scored = [{"detection": {"f1": f}, "floor": {"f1": f / 2}} for f in (0.3, 0.8, 0.95)]
        r["autointerp"] = {"latents": [*scored, {"detection": None, "floor": None}]}  # one latent not scored
    written = write_plots(report, tmp_path / "figs")
    assert [p.name for p in written] == list(FIGURES)
    for path in written:
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_write_plots_skips_delta_ce_without_downstream_metrics(tmp_path):
    written = write_plots({"saes": {"a": _sae_result(5.0, 0.5, 0)}}, tmp_path)
    assert [p.name for p in written] == [FIGURES[0], FIGURES[2]]
    assert not (tmp_path / FIGURES[1]).exists()


@pytest.mark.parametrize("report", [{}, {"saes": {}}])
def test_write_plots_refuses_a_report_without_saes(report, tmp_path):
    with pytest.raises(ValueError, match="no SAEs"):
        write_plots(report, tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_lm(ModelConfig(model=tiny_model, layer=LAYER, model_device="cpu"))


@pytest.fixture(scope="module")
def rows(lm, text_file):
    _, tokenizer = lm
    stream = TokenRows(load_texts(DataConfig(dataset=text_file, context_size=16)), tokenizer, 16)
    return [row for row, _ in stream.take(20)]


@pytest.fixture(scope="module")
def weights():
    """A random SAE on d_in 32, 24 latents; latent 0 can never fire (huge threshold)."""
    g = torch.Generator().manual_seed(1)
    d, f = 32, 24
    threshold = torch.full((f,), 0.5)
    threshold[0] = 1e9
    return {
        "W_enc": torch.randn(d, f, generator=g) / d**0.5,
        "b_enc": torch.zeros(f),
        "W_dec": torch.randn(f, d, generator=g),
        "b_dec": torch.randn(d, generator=g) * 0.1,
        "threshold": threshold,
    }


def _dense(lm, rows, weights):
    """Brute force: every kept token of every row in one padded batch, dense-encoded; (acts [N, F], row, pos)."""
    model, tokenizer = lm
    ids, mask = pad_rows(rows, tokenizer.pad_token_id)
    keep = keep_mask(ids, mask, tokenizer, True)
    x = layer_activations(model, LAYER, ids, mask)[keep].float()
    acts = reference.encode(x, weights["W_enc"], weights["b_enc"], weights["b_dec"], weights["threshold"], 1.0).acts
    where = keep.nonzero()
    return acts, where[:, 0], where[:, 1]


def test_streaming_top_k_equals_brute_force(lm, rows, weights):
    model, tokenizer = lm
    k = 5
    top = top_activations(model, tokenizer, LAYER, weights, rows, k=k, batch_rows=3)  # 7 batches to merge
    acts, row_of, pos_of = _dense(lm, rows, weights)
    at = {(int(r), int(p)): i for i, (r, p) in enumerate(zip(row_of, pos_of))}
    assert top.tokens == len(acts)
    assert torch.equal(top.fire_counts, (acts > 0).sum(0))
    expected = acts.topk(k, dim=0).values.T  # [F, k]
    scale = acts.abs().max()
    torch.testing.assert_close(top.values.clamp_min(0), expected, rtol=0, atol=1e-5 * scale)
    # Each reported context holds the reported value (ties, e.g. shared row prefixes, may pick either token).
    for j in range(acts.shape[1]):
        for value, r, p in zip(top.values[j], top.rows[j], top.positions[j]):
            assert abs(acts[at[int(r), int(p)], j] - value) <= 1e-5 * scale
    assert (top.values[0] <= 0).all() and top.fire_counts[0] == 0
    assert select_latents(top, 3, "index") == [0, 1, 2]
    chosen = select_latents(top, 3)
    assert top.fire_counts[chosen].tolist() == sorted(top.fire_counts.tolist(), reverse=True)[:3]


def test_latent_pages_colour_each_context_by_its_latent(lm, rows, weights):
    model, tokenizer = lm
    top = top_activations(model, tokenizer, LAYER, weights, rows, k=3)
    acts, row_of, pos_of = _dense(lm, rows, weights)
    at = {(int(r), int(p)): i for i, (r, p) in enumerate(zip(row_of, pos_of))}
    pages = latent_pages(model, tokenizer, LAYER, weights, rows, top, [0, 5, 7], context=4)
    assert [p.index for p in pages] == [0, 5, 7]
    assert pages[0].contexts == [] and pages[0].density == 0
    vocab = model.get_output_embeddings().weight.shape[0]
    for page in pages[1:]:
        assert len(page.contexts) == 3 and len(page.logit_effects) == min(10, vocab)
        assert page.density == int(top.fire_counts[page.index]) / top.tokens
        for c in page.contexts:
            assert len(c.tokens) == len(c.activations) <= 9
            assert c.activations[c.centre] == pytest.approx(float(acts[at[c.row, c.position], page.index]), abs=1e-4)
            assert max(c.activations) <= page.max_activation + 1e-4


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        self.urls += [v for k, v in attrs.items() if k in ("href", "src") and v]


def test_browser_html_is_self_contained_with_one_section_per_latent(lm, rows, weights, tmp_path):
    model, tokenizer = lm
    path = write_browser(
        tmp_path / "browser.html", model, tokenizer, LAYER, weights, rows, latents=4, k=3, order="index"
    )
    text = path.read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(text)
    parser.close()
    assert parser.sections == [f"latent-{j}" for j in range(4)]
    assert parser.urls == [] and "http://" not in text and "https://" not in text
    assert "<bos>" not in text and "&lt;bos&gt;" in text  # the BOS token's text, escaped in the contexts
    assert text.count("across the activation distribution") == 3  # latents 1-3 fire; latent 0 never does


def test_render_html_escapes_token_text():
    evil = "<script>alert(1)</script>"
    page = LatentPage(3, 0.25, 2.0, [Context(["a", evil, "&"], [0.0, 2.0, 1.0], 1, 0, 1)], [(evil, 1.5), ('"q"', 0.5)])
    text = render_html([page], title="<b>t</b>")
    assert evil not in text and "<b>t</b>" not in text
    assert text.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2 and "&amp;" in text
    assert text.count("<script>") == 1  # the browser's own sort/search script only
    parser = _Collect()
    parser.feed(text)
    assert parser.sections == ["latent-3"]


def test_eval_writes_figures_and_browser(lm, tiny_model, text_file, weights, tmp_path):
    npz = tmp_path / "params.npz"
    np.savez(npz, **{name: t.numpy() for name, t in weights.items()})
    out = tmp_path / "eval"
    args = [
        "eval",
        str(npz),
        "--model",
        tiny_model,
        "--layer",
        str(LAYER),
        "--dataset",
        text_file,
        "--context-size",
        "16",
        "--heldout-examples",
        "12",
        "--eval-tokens",
        "60",
        "--splice-rows",
        "0",
        "--eval-device",
        "cpu",
        "--out",
        str(out),
        "--browser-latents",
        "3",
        "--no-progress",
    ]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["saes"][str(npz)]["browser"] == "browser-0.html"
    parser = _Collect()
    parser.feed((out / "browser-0.html").read_text(encoding="utf-8"))
    assert len(parser.sections) == 3
    for name in (FIGURES[0], FIGURES[2]):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    assert not (out / FIGURES[1]).exists()  # no downstream metrics with --splice-rows 0


def test_quantile_samples_are_real_firings_spread_over_the_distribution(lm, rows, weights):
    model, tokenizer = lm
    acts, row_of, pos_of = _dense(lm, rows, weights)
    at = {(int(r), int(p)): i for i, (r, p) in enumerate(zip(row_of, pos_of))}
    fires = (acts > 0).sum(0)
    latents = [int(fires.argmax()), int((fires > 0).nonzero()[-1]), 0]  # busiest, another firing, never fires
    scale = float(acts.abs().max())
    for pool in (4, 10_000):  # a small pool forces the streaming bottom-k merge to drop candidates
        samples = quantile_samples(
            model, tokenizer, LAYER, weights, rows, latents, per_latent=5, pool=pool, batch_rows=3
        )
        for j, chosen in zip(latents, samples):
            assert len(chosen) == min(5, int(fires[j]), pool)
            values = [v for v, _, _ in chosen]
            assert values == sorted(values)  # weakest first
            for value, r, p in chosen:  # each is a real firing of latent j, with its activation
                assert value > 0 and abs(acts[at[r, p], j] - value) <= 1e-5 * scale
        busiest = torch.sort(acts[:, latents[0]][acts[:, latents[0]] > 0]).values
        if pool > len(busiest):  # the whole distribution was kept: exact quantiles, extremes included
            assert samples[0][0][0] == pytest.approx(float(busiest[0]), abs=1e-5 * scale)
            assert samples[0][-1][0] == pytest.approx(float(busiest[-1]), abs=1e-5 * scale)
