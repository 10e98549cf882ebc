"""PNG figures of an eval report (`sae.evaluation.report.evaluate`): the trade-off curves and the density
histograms.

matplotlib is imported inside `write_plots` with the non-interactive Agg backend, so importing this module
costs nothing and never needs a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FIGURES = (
    "explained_variance_vs_l0.png",
    "delta_ce_vs_l0.png",
    "density_histogram.png",
    "sparse_probing.png",
    "concept_removal.png",
    "autointerp_f1.png",
)
"""The files `write_plots` may write; delta_ce_vs_l0.png only when some SAE has downstream metrics,
sparse_probing.png and concept_removal.png only with --sparse-probing / --concept-removal, autointerp_f1.png only
with --autointerp-latents."""


def sae_label(path: str) -> str:
    """A short legend label for an SAE path: its last two components ("runs/a/step_100" -> "a/step_100")."""
    parts = Path(path).parts
    return "/".join(parts[-2:]) if parts else path


def _scatter(plt, points: list[tuple[str, float, float]], ylabel: str, title: str, out: Path) -> Path:
    """One labelled point per SAE: (label, L0, y)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, l0, y in points:
        ax.scatter(l0, y)
        ax.annotate(label, (l0, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_plots(report: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write the report's figures into `folder` (created if needed) and return their paths.

    - explained_variance_vs_l0.png: one labelled point per SAE.
    - delta_ce_vs_l0.png: the same with delta CE (nats), only for SAEs with downstream metrics.
    - density_histogram.png: each SAE's log10 firing-frequency histogram, overlaid; the legend gives
      each SAE's dead latents, which have no bin (log10 0 = -inf).
    """
    saes = report.get("saes") if isinstance(report, dict) else None
    if not saes:
        raise ValueError(
            "the report has no SAEs (report['saes'] is missing or empty): nothing to plot; "
            "pass the dict returned by sae.evaluation.report.evaluate with at least one SAE"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labelled = [(sae_label(path), r) for path, r in saes.items()]
    written = [
        _scatter(
            plt,
            [(label, r["sparsity"]["mean_l0"], r["reconstruction"]["explained_variance"]) for label, r in labelled],
            "explained variance (about the mean)",
            "Explained variance vs L0",
            folder / FIGURES[0],
        )
    ]
    down = [
        (label, r["sparsity"]["mean_l0"], r["downstream"]["delta_ce"])
        for label, r in labelled
        if r.get("downstream") and r["downstream"].get("delta_ce") is not None
    ]
    if down:
        written.append(_scatter(plt, down, "delta CE (nats, spliced - clean)", "Delta CE vs L0", folder / FIGURES[1]))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r in labelled:
        hist = r["density_histogram"]
        ax.stairs(hist["counts"], hist["edges"], label=f"{label} (dead: {hist['dead']})", alpha=0.8)
    tokens = report.get("heldout", {}).get("tokens")
    ax.set_xlabel("log10 firing frequency" + (f" (over {tokens:,} tokens)" if tokens else ""))
    ax.set_ylabel("latents")
    ax.set_title("Latent firing density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / FIGURES[2], dpi=100)
    plt.close(fig)
    written.append(folder / FIGURES[2])
    probing = [(label, r["sparse_probing"]) for label, r in labelled if "sparse_probing" in r]
    if probing:
        written.append(_probing_plot(plt, probing, folder / FIGURES[3]))
    removal = [(label, r["concept_removal"]) for label, r in labelled if "concept_removal" in r]
    if removal:
        written.append(_removal_plot(plt, removal, folder / FIGURES[4]))
    explained = [(label, r["autointerp"]["latents"]) for label, r in labelled if "autointerp" in r]
    if explained:
        written.append(_autointerp_plot(plt, explained, folder / FIGURES[5]))
    return written


def _autointerp_plot(plt, explained: list[tuple[str, list[dict]]], out: Path) -> Path:
    """Per SAE, the histogram of its latents' detection F1 (solid) and of the random-explanation floor's
    (dashed, same colour), over ten bins of [0, 1]."""
    import numpy as np

    edges = np.linspace(0, 1, 11)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, records in explained:
        f1 = [r["detection"]["f1"] for r in records if r["detection"]]
        floor = [r["floor"]["f1"] for r in records if r["floor"]]
        line = ax.stairs(np.histogram(f1, edges)[0], edges, label=f"{label} ({len(f1)} latents)", linewidth=2)
        if floor:
            ax.stairs(np.histogram(floor, edges)[0], edges, color=line.get_edgecolor(), linestyle="--", label="floor")
    ax.set_xlabel("detection F1 (dashed: each latent scored with another latent's explanation)")
    ax.set_ylabel("latents")
    ax.set_title("Autointerp: detection F1 vs the random-explanation floor")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _probing_plot(plt, probing: list[tuple[str, dict]], out: Path) -> Path:
    """Test accuracy against k per SAE, each SAE's dense-probe accuracy as a dashed line of its colour."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, p in probing:
        ks = sorted(int(k) for k in p["k"])
        (line,) = ax.plot(ks, [p["k"][k] if k in p["k"] else p["k"][str(k)] for k in ks], marker="o", label=label)
        ax.axhline(p["dense"], color=line.get_color(), linestyle="--", alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("k (latents, ranked by mean difference on the training split)")
    ax.set_ylabel("test accuracy (dashed: probe on the dense activations)")
    ax.set_title(f"k-sparse probing: {probing[0][1]['task']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _removal_plot(plt, removal: list[tuple[str, dict]], out: Path) -> Path:
    """Worst-group accuracy before, after ablating the attribute's latents, and after random latents, with the
    probe refitted and with the same probe."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    width = 0.8 / len(removal)
    keys = ("before", "after", "random", "after_fixed_probe", "random_fixed_probe")
    names = ["before", "attribute's\nlatents", "random\nlatents", "attribute's\n(same probe)", "random\n(same probe)"]
    for i, (label, c) in enumerate(removal):
        values = [c[k]["worst_group"] for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], values, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], names, fontsize=8)
    ax.set_ylabel("worst-group test accuracy")
    ax.set_title(f"Concept removal: {removal[0][1]['task']} ({removal[0][1]['n_latents']} latents ablated)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
