"""`python -m sae eval`: several SAEs side by side on the same held-out tokens (RECIPES section 3).

Held-out tokens: the examples at the END of the first epoch's seeded order (the order the harvester trains
in, from its start), so a run that read less than one epoch never saw them; each SAE's checkpoint says how
far its training read, and the report says whether the two overlap.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from harvest.activations import keep_mask, layer_activations
from harvest.config import DataConfig, ModelConfig
from harvest.lm import load_lm
from harvest.text import TokenRows, load_texts
from kernels import reference
from sae import checkpoint as ckpt
from sae.errors import ConfigError
from sae.evaluation.dark_matter import DarkMatterAccumulator, LinearResidualFit
from sae.evaluation.metrics import FiringAccumulator, ReconstructionAccumulator
from sae.evaluation.splice import (
    FORWARD_BANDWIDTH,
    activation_mean,
    downstream_loss,
    pad_rows,
    sae_from_weights,
    sae_params,
)
from sae.pretrained import load_pretrained


@dataclass
class EvalConfig:
    """Which tokens to evaluate on and which metrics to compute."""

    model: str | None = None
    """Language model; default: the first SAE's metadata model_name."""
    layer: int | None = None
    """Hooked decoder layer; default: the first SAE's metadata hook_layer."""
    dataset: str | None = None
    """Text to evaluate on; default: the first SAE's metadata dataset_path."""
    text_field: str = "text"
    """Column holding the text."""
    data_dir: str | None = None
    """Local copies of a preset's hub datasets (medical-qa); default: the first SAE's metadata data_dir."""
    context_size: int | None = None
    """Tokens per row; default: the first SAE's metadata context_size."""
    data_seed: int = 0
    """The training runs' --data-seed: it fixes the example order, whose end is held out."""
    heldout_examples: int = 400
    """How many examples at the end of the first epoch's order are held out for evaluation."""
    eval_tokens: int = 16384
    """Activations to evaluate reconstruction and sparsity on."""
    exclude_special_tokens: bool = True
    """Leave BOS/EOS/pad positions out of the metrics and the splice (Gemma Scope); --no-exclude-special-tokens
    includes BOS, as the Salmon paper's numbers did (its huge norm inflates explained variance)."""
    dark_matter_fit_tokens: int = 0
    """Tokens (from the same held-out set, before the scored ones) to fit the linear residual on; at least
    100 * d_in for a stable fit. 0 skips the dark-matter metrics."""
    splice_rows: int = 8
    """Held-out rows on which the reconstruction is spliced into the LM for delta CE (4 full LM forwards
    per row and SAE); 0 skips the downstream metrics."""
    dense_threshold: float = 0.1
    """A latent is dense when it fires on more than this fraction of tokens."""
    out: str = "runs/eval"
    """Folder for report.json and report.md."""
    eval_device: str = "auto"
    """Device for the LM and the SAEs: cpu, cuda, or auto."""
    browser_latents: int = 0
    """Write browser-<i>.html per SAE (i: its place on the command line) into --out: the top contexts and
    logit effects of its this many most often firing latents, on the held-out rows. 0 skips it."""
    sparse_probing: str | None = None
    """k-sparse probing on a labelled task: icd10-chapters (offline), bias-in-bios[:DIR], or a .csv/.jsonl file
    with text and label columns; the test accuracy of probes on the k = 1, 2, 5, 10, 20, 50 latents ranked by mean
    difference, against a probe on the dense activations. None skips it."""
    concept_removal: str | None = None
    """Concept removal on a task with a spurious attribute: icd10-encounter (offline), bias-in-bios[:DIR], or a
    .csv/.jsonl file with text, label and spurious columns; worst-group accuracy before and after ablating the
    attribute's latents, against random ones. None skips it."""
    probe_texts: int = 200
    """Texts per class (per label x attribute group for concept removal) in each split of the labelled task."""
    removal_latents: int = 20
    """How many latents concept removal ablates (those most tied to the spurious attribute)."""
    spurious_correlation: float = 0.95
    """The fraction of the concept-removal task's training texts whose spurious attribute equals their label
    (icd10-encounter, bias-in-bios; 0.5 none, 1 complete); a local file keeps its own."""
    autointerp_latents: int = 0
    """Automated interpretation of this many latents per SAE, drawn (seeded by --data-seed) from those firing on
    the held-out rows: an explainer LM describes each from its top and quantile contexts, a scorer LM classifies
    held-out contexts from that alone; detection F1 per latent beside a random-explanation floor, also in the
    browser. Answers are cached in OUT/autointerp-answers.jsonl (a rerun resumes). 0 skips it."""
    autointerp_endpoint: str | None = None
    """An OpenAI-compatible server for the explainer and scorer (vLLM, llama.cpp's server, Ollama), e.g.
    http://localhost:8000; None runs --autointerp-model locally through transformers."""
    autointerp_model: str | None = None
    """The model the endpoint serves (needed with --autointerp-endpoint); without one, a local transformers model,
    by default the offline Gemma-3 270M (its explanations are weak: a pipeline check, not a measurement)."""
    autointerp_timeout_s: float = 60.0
    """Seconds to wait for one answer from the endpoint."""
    autointerp_retries: int = 3
    """Retries of a request the endpoint did not answer (waiting 1, 2, 4, ... s between them); 0 fails at once."""

    def __post_init__(self) -> None:
        for name in ("heldout_examples", "eval_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.probe_texts < 2 or self.removal_latents < 1:
            raise ConfigError("--probe-texts must be >= 2 and --removal-latents >= 1")
        if self.dark_matter_fit_tokens < 0 or self.splice_rows < 0 or self.browser_latents < 0:
            raise ConfigError("--dark-matter-fit-tokens, --splice-rows and --browser-latents must be >= 0")
        if self.autointerp_latents < 0 or self.autointerp_retries < 0 or self.autointerp_timeout_s <= 0:
            raise ConfigError("--autointerp-latents and --autointerp-retries must be >= 0, --autointerp-timeout-s > 0")


@dataclass
class EvalCommand:
    """The settings of `python -m sae eval`."""

    eval: EvalConfig


def _load(path: str) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any] | None]:
    """(raw weights, cfg.json metadata or {}, training_state.json or None) of an SAE path."""
    weights = load_pretrained(path)
    p = Path(path)
    if p.suffix == ".npz":
        return weights, {}, None
    folder = p if (p / ckpt.WEIGHTS_FILE).exists() else ckpt.find_checkpoint(p)
    meta = json.loads((folder / ckpt.CFG_FILE).read_text()).get("metadata", {})
    info = ckpt.load_training_info(folder) if (folder / ckpt.STATE_JSON_FILE).exists() else None
    return weights, meta, info


def _overlap(info: dict[str, Any] | None, dataset: str, data_seed: int, heldout_start: int) -> bool | None:
    """Whether the run's training text reached the held-out examples; None when it cannot be told.

    A run trained on another dataset never saw them. Otherwise the checkpoint's data position says where
    the current buffer segment began reading; that segment read about as many examples as each earlier one,
    so the run read up to start * (segments + 1) / segments examples of the same seeded order. (Positions of
    the older fill-based harvester, {"fill_start", "fill"}, read the same way.)
    """
    position = (info or {}).get("data_position")
    data = (info or {}).get("config", {}).get("data", {})
    if data.get("dataset") not in (None, dataset):
        return False
    if not position or data.get("data_seed") != data_seed:
        return None
    if "cursor" in position:
        start, fills = position["cursor"]["group_start"], position["segment"]
    else:
        start, fills = position["fill_start"], position["fill"]
    if start["epoch"] > 0:
        return True
    if fills == 0:
        return None
    return start["index"] * (fills + 1) / fills >= heldout_start


def evaluate(cfg: EvalConfig, sae_paths: list[str], progress: bool = True) -> dict[str, Any]:
    tasks = _labelled_tasks(cfg)  # before any model work: a missing dataset or label column fails here
    saes = {path: _load(path) for path in sae_paths}
    explainer = _autointerp_client(cfg, saes) if cfg.autointerp_latents else None  # before any model work
    first_meta = next(iter(saes.values()))[1]
    model_name = cfg.model or first_meta.get("model_name")
    layer = cfg.layer if cfg.layer is not None else first_meta.get("hook_layer")
    dataset = cfg.dataset or first_meta.get("dataset_path")
    context = cfg.context_size or first_meta.get("context_size")
    if None in (model_name, layer, dataset, context):
        raise ConfigError("the first SAE has no metadata: pass --model, --layer, --dataset and --context-size")
    lm, tokenizer = load_lm(ModelConfig(model=model_name, layer=layer, model_device=cfg.eval_device))
    device = next(lm.parameters()).device
    d_in = lm.config.get_text_config().hidden_size
    for path, (weights, _, _) in saes.items():
        if weights["W_enc"].shape[0] != d_in:
            raise ConfigError(f"{path} has d_in={weights['W_enc'].shape[0]}, but {model_name} has {d_in}")
    data_dir = cfg.data_dir or (first_meta.get("data_dir") if dataset == first_meta.get("dataset_path") else None)
    data = DataConfig(dataset=dataset, text_field=cfg.text_field, context_size=context, data_dir=data_dir)
    rows = TokenRows(load_texts(data), tokenizer, context, cfg.data_seed)
    start = max(0, rows.num_examples - cfg.heldout_examples)
    rows.seek({"epoch": 0, "index": start})

    need = cfg.dark_matter_fit_tokens + cfg.eval_tokens
    activations, token_rows, n = [], [], 0
    with tqdm(total=need, desc="harvesting held-out tokens", unit="tok", disable=not progress) as bar:
        while n < need and rows.position()["epoch"] == 0:
            batch = [row for row, _ in rows.take(min(16, rows.num_examples - rows.position()["index"]))]
            token_rows += batch
            ids, mask = pad_rows(batch, tokenizer.pad_token_id or 0, device)
            keep = keep_mask(ids, mask, tokenizer, cfg.exclude_special_tokens)
            acts = layer_activations(lm, layer, ids, mask)[keep].float()
            activations.append(acts)
            n += len(acts)
            bar.update(len(acts))
    x_all = torch.cat(activations)[:need]
    if len(x_all) < need:
        raise ConfigError(
            f"the {cfg.heldout_examples} held-out examples hold only {len(x_all)} tokens; lower --eval-tokens "
            "or raise --heldout-examples"
        )
    x_fit, x = x_all[: cfg.dark_matter_fit_tokens], x_all[cfg.dark_matter_fit_tokens :]
    splice_batches = [
        pad_rows(token_rows[i : i + 4], tokenizer.pad_token_id or 0, device) for i in range(0, cfg.splice_rows, 4)
    ]
    mean = activation_mean(lm, tokenizer, layer, splice_batches, cfg.exclude_special_tokens) if splice_batches else None

    results = {}
    for i, (path, (weights, _, info)) in enumerate(saes.items()):
        params = sae_params(weights, device)
        dark = None
        if cfg.dark_matter_fit_tokens:
            fit = LinearResidualFit()
            with torch.no_grad():
                for chunk in x_fit.split(4096):
                    fit.update(chunk, reference.sae_forward(chunk, *params, bandwidth=FORWARD_BANDWIDTH).x_hat)
            dark = DarkMatterAccumulator(fit.solve())
        rec, fires = ReconstructionAccumulator(), FiringAccumulator(weights["W_enc"].shape[1], device)
        errors = []
        with torch.no_grad():  # one SAE forward per scored chunk feeds every accumulator
            for chunk in x.split(4096):
                out = reference.sae_forward(chunk, *params, bandwidth=FORWARD_BANDWIDTH)
                rec.update(chunk, out.x_hat)
                fires.update(out.indices, out.values)
                errors.append((chunk - out.x_hat).pow(2).sum(-1).cpu())
                if dark is not None:
                    dark.update(chunk, out.x_hat)
        recon, sparsity = rec.result(), fires.result(cfg.dense_threshold)
        errors = torch.cat(errors).double()
        worst = errors.topk(max(1, len(errors) // 100)).values
        result: dict[str, Any] = {
            "reconstruction": recon._asdict(),
            "tail_fvu_worst_1pct": float(worst.mean() / recon.variance),
            "sparsity": {k: v for k, v in sparsity._asdict().items() if not isinstance(v, Tensor)},
            "density_histogram": {
                k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in sparsity.histogram()._asdict().items()
            },
            "heldout_overlaps_training": _overlap(info, dataset, cfg.data_seed, start),
        }
        if dark is not None:
            result["dark_matter"] = dark.result()._asdict()
        if splice_batches:
            result["downstream"] = downstream_loss(
                lm,
                tokenizer,
                layer,
                splice_batches,
                sae_from_weights(weights, device),
                mean=mean,
                exclude_special_tokens=cfg.exclude_special_tokens,
            )._asdict()
        if explainer is not None:
            from sae.evaluation.autointerp.pipeline import autointerp_sae

            w = {k: v.to(device) for k, v in weights.items()}
            result["autointerp"] = autointerp_sae(
                lm, tokenizer, layer, w, token_rows, explainer, cfg.autointerp_latents, cfg.data_seed, progress=progress
            )
        if cfg.browser_latents or explainer is not None:
            from sae.evaluation.autointerp.sections import browser_notes
            from sae.evaluation.browser import write_browser

            w = {k: v.to(device) for k, v in weights.items()}
            result["browser"] = write_browser(
                Path(cfg.out) / f"browser-{i}.html",
                lm,
                tokenizer,
                layer,
                w,
                token_rows,
                cfg.browser_latents,
                title=path,
                notes=browser_notes(result.get("autointerp")),
            ).name
        results[path] = result
    if tasks:
        _interpretability(cfg, tasks, saes, results, lm, tokenizer, layer, context, progress)
    return {
        "config": asdict(cfg),
        "model": model_name,
        "layer": layer,
        "dataset": dataset,
        "context_size": context,
        "heldout": {
            "first_example": start,
            "examples": rows.num_examples - start,
            "tokens": len(x),
            "dark_matter_fit_tokens": len(x_fit),
            "splice_rows": cfg.splice_rows,
        },
        "saes": results,
    }


def _autointerp_client(cfg: EvalConfig, saes: dict):
    """The cached explainer/scorer LM of --autointerp-latents, after checking every SAE has that many latents."""
    from sae.evaluation.autointerp.pipeline import eval_client

    for path, (weights, _, _) in saes.items():
        if cfg.autointerp_latents > weights["W_enc"].shape[1]:
            raise ConfigError(
                f"--autointerp-latents {cfg.autointerp_latents}: {path} has only {weights['W_enc'].shape[1]} "
                "latents; ask for at most that many"
            )
    cache = Path(cfg.out) / "autointerp-answers.jsonl"
    return eval_client(
        cfg.autointerp_endpoint, cfg.autointerp_model, cfg.autointerp_timeout_s, cfg.eval_device, cache,
        retries=cfg.autointerp_retries,
    )  # fmt: skip


def _labelled_tasks(cfg: EvalConfig) -> dict:
    from sae.evaluation.labelled import load_task

    tasks = {}
    if cfg.sparse_probing:
        tasks["sparse_probing"] = load_task(cfg.sparse_probing, cfg.probe_texts, fields=(cfg.text_field, "label", None))
    if cfg.concept_removal:
        fields = (cfg.text_field, "label", "spurious")
        tasks["concept_removal"] = load_task(
            cfg.concept_removal, cfg.probe_texts, fields=fields, correlation=cfg.spurious_correlation
        )
    return tasks


def _interpretability(cfg, tasks, saes, results, lm, tokenizer, layer, context, progress) -> None:
    """The k-sparse probing and concept-removal sections of every SAE (sae/evaluation/interpretability.py)."""
    from sae.evaluation import interpretability as interp

    device = next(lm.parameters()).device
    weights = [{k: v.to(device).float() for k, v in w.items()} for w, _, _ in saes.values()]
    args = (lm, tokenizer, layer, weights, context, cfg.exclude_special_tokens)
    if "sparse_probing" in tasks:
        sections = interp.sparse_probing_sections(tasks["sparse_probing"], *args, progress=progress)
        for path, section in zip(saes, sections):
            results[path]["sparse_probing"] = section
    if "concept_removal" in tasks:
        sections = interp.concept_removal_sections(tasks["concept_removal"], *args, cfg.removal_latents, progress)
        for path, section in zip(saes, sections):
            results[path]["concept_removal"] = section


def interpretability_lines(report: dict[str, Any]) -> list[str]:
    """report.md's lines for k-sparse probing and concept removal, where the report has them."""
    lines = []
    for path, r in report["saes"].items():
        if "sparse_probing" in r:
            p = r["sparse_probing"]
            ks = ", ".join(f"k={k}: {acc:.3f}" for k, acc in p["k"].items())
            lines.append(f"- {path}: k-sparse probing on {p['task']}: {ks}; dense probe {p['dense']:.3f}")
        if "concept_removal" in r:
            c = r["concept_removal"]
            b, a, rnd = c["before"], c["after"], c["random"]
            f, rf = c["after_fixed_probe"], c["random_fixed_probe"]
            lines.append(
                f"- {path}: concept removal on {c['task']} ({c['spurious']}, {c['n_latents']} latents): worst-group "
                f"accuracy {b['worst_group']:.3f} -> {a['worst_group']:.3f} refitted probe, {f['worst_group']:.3f} "
                f"same probe (random latents {rnd['worst_group']:.3f} / {rf['worst_group']:.3f}); overall "
                f"{b['accuracy']:.3f} -> {a['accuracy']:.3f} / {f['accuracy']:.3f} (random {rnd['accuracy']:.3f} / "
                f"{rf['accuracy']:.3f})"
            )
    return lines


def markdown_table(report: dict[str, Any]) -> str:
    """One row per SAE: the headline numbers."""
    head = (
        "| SAE | L0 | FVU | explained var. | worst-1% FVU | dead | dense | delta CE | recovered (zero) "
        "| recovered (mean) | KL | dark-matter R^2 | FVU nonlinear |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for path, r in report["saes"].items():
        down, dm = r.get("downstream", {}), r.get("dark_matter", {})

        def f(value, spec=".3f"):
            return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

        lines.append(
            f"| {path} | {r['sparsity']['mean_l0']:.1f} | {f(r['reconstruction']['fvu'])} "
            f"| {f(r['reconstruction']['explained_variance'])} | {f(r['tail_fvu_worst_1pct'])} "
            f"| {r['sparsity']['dead_fraction']:.1%} | {r['sparsity']['dense_fraction']:.1%} "
            f"| {f(down.get('delta_ce'))} | {f(down.get('loss_recovered_zero'))} "
            f"| {f(down.get('loss_recovered_mean'))} | {f(down.get('kl'))} | {f(dm.get('r2_error'))} "
            f"| {f(dm.get('fvu_nonlinear'))} |"
        )
    h = report["heldout"]
    lines.append(
        f"\n{h['tokens']:,} held-out tokens ({h['examples']} examples from #{h['first_example']} of the seeded "
        f"order, special tokens {'excluded' if report['config']['exclude_special_tokens'] else 'included'}; "
        f"dead = no fire in these tokens); delta CE over {h['splice_rows']} rows."
    )
    extra = interpretability_lines(report)
    if extra:
        lines += ["", "Interpretability (test splits of the labelled tasks):", *extra]
    from sae.evaluation.autointerp.sections import markdown_lines

    explained = markdown_lines(report)
    if explained:
        lines += ["", "Autointerp (explainer and scorer LM; floor: each latent scored with another's explanation):"]
        lines += explained
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: str) -> Path:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (folder / "report.md").write_text(markdown_table(report))
    from sae.evaluation.plots import write_plots

    write_plots(report, folder)
    return folder
