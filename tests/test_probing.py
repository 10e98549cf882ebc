"""k-sparse probing and concept removal (issue 15) on constructed cases whose answers are known."""

from __future__ import annotations

import json

import pytest
import torch

from kernels import reference
from sae.errors import ConfigError
from sae.evaluation.concept_removal import LabelledActivations, concept_removal
from sae.evaluation.labelled import load_task
from sae.evaluation.probes import fit_probe, predict, worst_group_accuracy
from sae.evaluation.sparse_probing import k_sparse_probing, mean_difference_scores, top_latents


def brute_force_scores(latents: torch.Tensor, y: torch.Tensor) -> list[float]:
    """The mean-difference criterion written out latent by latent, class by class (one-vs-rest for > 2)."""
    classes, labels = sorted(set(y.tolist())), y.tolist()

    def mean(column: list[float], keep) -> float:
        rows = [v for v, c in zip(column, labels) if keep(c)]
        return sum(rows) / len(rows)

    scores = []
    for j in range(latents.shape[1]):
        column = latents[:, j].tolist()
        if len(classes) == 2:
            scores.append(abs(mean(column, lambda c: c == classes[1]) - mean(column, lambda c: c == classes[0])))
        else:
            diffs = [abs(mean(column, lambda c, k=k: c == k) - mean(column, lambda c, k=k: c != k)) for k in classes]
            scores.append(max(diffs))
    return scores


@pytest.mark.parametrize("classes", [2, 3])
def test_k_sparse_probing_equals_a_brute_force_computation(classes):
    g = torch.Generator().manual_seed(classes)
    latents = torch.rand(60, 9, generator=g).double() * (torch.rand(60, 9, generator=g) > 0.5)
    y = torch.arange(60) % classes
    scores = brute_force_scores(latents, y)
    torch.testing.assert_close(mean_difference_scores(latents, y), torch.tensor(scores, dtype=torch.float64))
    test = torch.rand(30, 9, generator=g).double()
    y_test = torch.arange(30) % classes
    result = k_sparse_probing(latents, y, test, y_test, ks=[1, 2, 5, 9])
    for k in (1, 2, 5, 9):
        chosen = sorted(range(9), key=lambda j: (-scores[j], j))[:k]  # by score, ties to the lower index
        assert result["latents"][k] == chosen
        by_hand = predict(fit_probe(latents[:, chosen], y), test[:, chosen])
        assert result["k"][k] == float((by_hand == y_test).double().mean())


def test_one_latent_that_carries_the_label_is_found_and_suffices():
    g = torch.Generator().manual_seed(0)
    latents = torch.rand(200, 20, generator=g)
    y = (torch.arange(200) % 2).long()
    latents[:, 13] = y * 2.0 + 0.1 * torch.rand(200, generator=g)
    result = k_sparse_probing(latents[:100], y[:100], latents[100:], y[100:], dense=(latents[:100], latents[100:]))
    assert result["latents"][1] == [13] and result["k"][1] == 1.0
    assert sorted(result["k"]) == [1, 2, 5, 10, 20]  # the default ks up to d_sae = 20
    assert result["dense"] > 0.95


def test_more_latents_than_the_sae_has_is_refused():
    with pytest.raises(ConfigError, match="top 50 latents but the SAE has only 20; ask for at most 20"):
        top_latents(torch.rand(10, 20), torch.arange(10) % 2, 50)
    with pytest.raises(ConfigError, match="at least two classes"):
        k_sparse_probing(torch.rand(10, 4), torch.zeros(10, dtype=torch.long), torch.rand(5, 4), torch.zeros(5))


def planted(
    n: int, correlated: bool, g: torch.Generator, label: float = 1.0, attribute: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations in which latent 0 carries the target label (noisily) and latent 1 the spurious attribute
    (cleanly, and strongly); in training the attribute equals the label 95% of the time, in test it is
    independent of it. The other 6 coordinates are noise. The dictionary is the identity (below)."""
    y = torch.randint(0, 2, (n,), generator=g)
    s = (
        torch.where(torch.rand(n, generator=g) < 0.95, y, 1 - y)
        if correlated
        else torch.randint(0, 2, (n,), generator=g)
    )
    x = 0.3 * torch.rand(n, 8, generator=g)
    x[:, 0] = 1.0 + label * y + 0.6 * torch.randn(n, generator=g)  # the label: noisy (weak by default)
    x[:, 1] = 1.0 + attribute * s + 0.05 * torch.randn(n, generator=g)  # the attribute: clean (strong by default)
    return x, y, s


def test_concept_removal_finds_the_planted_spurious_latent_and_restores_worst_group_accuracy():
    g = torch.Generator().manual_seed(0)
    eye = torch.eye(8)
    threshold = torch.full((8,), 1e-3)

    def encode(x: torch.Tensor) -> torch.Tensor:  # an SAE whose latent j is coordinate j (JumpReLU)
        return reference.encode(x, eye, torch.zeros(8), torch.zeros(8), threshold, 1e-3).acts

    train, test = planted(2000, True, g), planted(2000, False, g)
    split = lambda x, y, s: LabelledActivations(x, encode(x), y, s)  # noqa: E731
    result = concept_removal(eye, split(*train), split(*test), n_latents=1, random_draws=4, seed=0)
    assert result["ablated"] == [1]  # the attribute's latent, by the mean-difference criterion
    before, after, random = result["before"], result["after"], result["random"]
    assert before["worst_group"] < 0.3  # the probe took the shortcut: the groups where attribute != label fail
    assert after["worst_group"] > 0.7 and after["worst_group"] > before["worst_group"] + 0.4
    assert random["worst_group"] < before["worst_group"] + 0.2  # 4 random draws of 1 of 8 latents: mostly not it
    # The same probe, not refitted: with the attribute's latent held at its mean it falls back on the label's.
    fixed = result["after_fixed_probe"]
    assert fixed["worst_group"] > 0.7 and fixed["worst_group"] > before["worst_group"] + 0.4
    assert result["random_fixed_probe"]["worst_group"] < before["worst_group"] + 0.2
    # The worst group by hand for the probe before ablation, as a cross-check of the groups' definition.
    x_tr, y_tr, _ = train
    x_te, y_te, s_te = test
    predicted = predict(fit_probe(x_tr, y_tr), x_te)
    assert before["worst_group"] == worst_group_accuracy(predicted, y_te, 2 * y_te + s_te)


def test_concept_removal_refuses_impossible_requests():
    g = torch.Generator().manual_seed(1)
    (x, y, s), (xt, yt, st) = planted(100, True, g), planted(100, False, g)
    train, test = LabelledActivations(x, x, y, s), LabelledActivations(xt, xt, yt, st)
    with pytest.raises(ConfigError, match="ablate 9 latents but the SAE has 8"):
        concept_removal(torch.eye(8), train, test, n_latents=9)
    with pytest.raises(ConfigError, match="two values of the spurious attribute"):
        concept_removal(torch.eye(8), train._replace(spurious=torch.zeros_like(s)), test)


def test_icd10_tasks_are_balanced_deterministic_and_correlated_only_in_training():
    chapters = load_task("icd10-chapters", per_class=30, seed=1)
    assert torch.bincount(chapters.train.labels).tolist() == [30] * 5 == torch.bincount(chapters.test.labels).tolist()
    assert not set(chapters.train.texts) & set(chapters.test.texts)
    assert load_task("icd10-chapters", per_class=30, seed=1).train.texts == chapters.train.texts
    task = load_task("icd10-encounter", per_class=40, seed=0)
    train, test = task.train, task.test
    agree = float((train.labels == train.spurious).double().mean())
    assert 0.9 <= agree <= 0.97  # the shortcut the probe can take in training
    groups = torch.bincount(2 * test.labels + test.spurious).tolist()
    assert groups == [40, 40, 40, 40]  # every label x encounter group alike in test
    for text, y, s in zip(test.texts, test.labels.tolist(), test.spurious.tolist()):
        assert text.endswith(("initial encounter", "subsequent encounter")[s])
        words = set(text.replace(",", " ").split())
        assert ("right" in words, "left" in words) == ((True, False), (False, True))[y]  # the side, one only
    looser = load_task("icd10-encounter", per_class=40, seed=0, correlation=0.75).train
    assert 0.7 <= float((looser.labels == looser.spurious).double().mean()) <= 0.8
    with pytest.raises(ConfigError, match="between 0.5 .none. and 1 .complete.; got 1.5"):
        load_task("icd10-encounter", correlation=1.5)


def test_bias_in_bios_loads_from_a_local_copy_in_the_hubs_format(tmp_path):
    rng = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        genders = torch.randint(0, 2, (120,), generator=rng).tolist()
        rows = [
            {"hard_text": f"{split} bio {i} of a {p}", "profession": p, "gender": genders[i]}
            for i, p in enumerate([21, 13, 4] * 40)
        ]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(f"bias-in-bios:{tmp_path}", per_class=4)
    assert task.label_names == ["professor", "nurse"] and task.spurious_name == "gender"
    assert all(" 4" not in t.split("of a")[1] for t in task.train.texts)  # profession 4 (comedian) left out
    assert torch.bincount(2 * task.test.labels + task.test.spurious).tolist() == [4, 4, 4, 4]
    (tmp_path / "test.jsonl").unlink()
    with pytest.raises(ConfigError, match="test.jsonl"):
        load_task(f"bias-in-bios:{tmp_path}")


def test_a_task_whose_labels_are_missing_is_refused(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text(json.dumps({"text": "a", "label": "x"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(ConfigError, match="row 2 has no label .* --label-field"):
        load_task(str(path))
    with pytest.raises(ConfigError, match="unknown labelled task 'no-such-task'"):
        load_task("no-such-task")


def test_concept_removal_does_not_take_a_strong_label_latent_for_the_attribute():
    """The label's latent differs between the attribute groups too (they go together in training); ranked within
    each label class it scores about 0, so the attribute's weaker latent is the one ablated."""
    g = torch.Generator().manual_seed(2)
    train, test = planted(2000, True, g, label=3.0, attribute=1.0), planted(2000, False, g, label=3.0, attribute=1.0)
    split = lambda x, y, s: LabelledActivations(x, x.clamp_min(0), y, s)  # noqa: E731
    result = concept_removal(torch.eye(8), split(*train), split(*test), n_latents=1, random_draws=2)
    assert result["ablated"] == [1]
    assert result["after"]["worst_group"] > 0.8  # the label's latent kept: the probe still works
