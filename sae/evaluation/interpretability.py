"""The eval report's k-sparse probing and concept-removal sections (`--sparse-probing TASK`, `--concept-removal
TASK`): the task's texts (sae/evaluation/labelled.py) through the language model to the SAEs' layer, each text's
activations and each SAE's latent activations averaged over its tokens (special tokens left out as in the rest
of the report), then sae/evaluation/sparse_probing.py and concept_removal.py per SAE."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from harvest.activations import keep_mask, layer_activations
from kernels import reference
from sae.errors import ConfigError
from sae.evaluation.concept_removal import LabelledActivations, concept_removal
from sae.evaluation.labelled import Task
from sae.evaluation.sparse_probing import k_sparse_probing
from sae.evaluation.splice import FORWARD_BANDWIDTH


def pooled_activations(
    lm, tokenizer, layer: int, texts: list[str], weights: list[dict[str, Tensor]], context: int,
    exclude_special_tokens: bool, progress: bool = False, batch: int = 16,
) -> tuple[Tensor, list[Tensor]]:  # fmt: skip
    """(x [N, D], [latents [N, F] per SAE]): each text's activations and latent activations, means over its
    first `context` tokens."""
    device = next(lm.parameters()).device
    xs: list[Tensor] = []
    latents: list[list[Tensor]] = [[] for _ in weights]
    for start in tqdm(range(0, len(texts), batch), desc="labelled texts", disable=not progress):
        enc = tokenizer(texts[start : start + batch], return_tensors="pt", padding=True, truncation=True,
                        max_length=context)  # fmt: skip
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        keep = keep_mask(ids, mask, tokenizer, exclude_special_tokens)
        keep[keep.sum(1) == 0] = mask.bool()[keep.sum(1) == 0]  # a text of special tokens only: keep them
        acts = layer_activations(lm, layer, ids, mask).float()  # [R, T, D]
        weight = keep.float() / keep.sum(1, keepdim=True)
        xs.append(torch.einsum("rt,rtd->rd", weight, acts))
        flat = acts[keep]
        rows = torch.repeat_interleave(torch.arange(len(ids), device=device), keep.sum(1))
        for i, w in enumerate(weights):
            f = reference.encode(flat, w["W_enc"], w["b_enc"], w["b_dec"], w["threshold"], FORWARD_BANDWIDTH).acts
            pooled = torch.zeros(len(ids), f.shape[1], device=device).index_add_(0, rows, f)
            latents[i].append(pooled / keep.sum(1, keepdim=True))
    return torch.cat(xs), [torch.cat(parts) for parts in latents]


def _encode_splits(task: Task, lm, tokenizer, layer, weights, context, exclude, progress):
    out = {}
    for name, split in (("train", task.train), ("test", task.test)):
        out[name] = pooled_activations(lm, tokenizer, layer, split.texts, weights, context, exclude, progress)
    return out


def sparse_probing_sections(
    task: Task, lm, tokenizer, layer: int, weights: list[dict[str, Tensor]], context: int, exclude: bool,
    progress: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """Per SAE: test accuracy of the k-latent probes and of the dense probe on the task."""
    acts = _encode_splits(task, lm, tokenizer, layer, weights, context, exclude, progress)
    (x_tr, lat_tr), (x_te, lat_te) = acts["train"], acts["test"]
    sections = []
    for i in range(len(weights)):
        result = k_sparse_probing(lat_tr[i], task.train.labels, lat_te[i], task.test.labels, dense=(x_tr, x_te))
        sections.append({"task": task.name, "classes": task.label_names, **_sizes(task), **result})
    return sections


def concept_removal_sections(
    task: Task, lm, tokenizer, layer: int, weights: list[dict[str, Tensor]], context: int, exclude: bool,
    n_latents: int, progress: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """Per SAE: the probe's overall and worst-group accuracy before and after ablating the attribute's latents."""
    if task.spurious_name is None:
        raise ConfigError(
            f"task {task.name} has no spurious attribute: it is a probing task, not a concept-removal one"
        )
    acts = _encode_splits(task, lm, tokenizer, layer, weights, context, exclude, progress)
    sections = []
    for i, w in enumerate(weights):
        train = LabelledActivations(acts["train"][0], acts["train"][1][i], task.train.labels, task.train.spurious)
        test = LabelledActivations(acts["test"][0], acts["test"][1][i], task.test.labels, task.test.spurious)
        result = concept_removal(w["W_dec"], train, test, n_latents)
        sections.append({"task": task.name, "spurious": task.spurious_name, **_sizes(task), **result})
    return sections


def _sizes(task: Task) -> dict[str, int]:
    return {"train_texts": len(task.train.texts), "test_texts": len(task.test.texts)}
