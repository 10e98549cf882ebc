"""Where the harvester's tokens come from: streams, packing, the medical QA mixture, background tokenisation."""

import json
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from harvest import BufferConfig, DataConfig, Harvester, ModelConfig
from harvest.config import MEDICAL_QA_DATASET
from harvest.errors import HarvestError
from harvest.medical_qa import SOURCES, format_mcq, format_medmcqa, format_pubmedqa
from harvest.prefetch import Prefetcher
from harvest.text import TokenRows, load_texts, token_rows

BOS, EOS = 2, 1  # the tiny model's tokenizer (tests/conftest.py)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def stream_of(text_file, **data) -> object:
    return load_texts(DataConfig(dataset=text_file, streaming=True, **{"shuffle_buffer": 8, **data}))


def roundtrip(position: dict) -> dict:
    return json.loads(json.dumps(position))


def examples_in_order(texts, tokenizer, n, data_seed=0, max_examples=None) -> list[list[int]]:
    """The tokens of the first n examples in the stream's order (rows wide enough that nothing is truncated)."""
    return [row[1:] for row, _ in TokenRows(texts, tokenizer, 1000, data_seed, max_examples).take(n)]


# ------------------------------------------------------------------------------------------ map-style


def test_map_style_rows_and_positions_are_those_of_earlier_releases(tokenizer, text_file):
    """Checkpoints and the held-out evaluation hold positions {epoch, index} in this exact order."""
    texts = load_texts(DataConfig(dataset=text_file))
    rows = TokenRows(texts, tokenizer, 16, data_seed=3, max_examples=7).take(16)
    first = np.random.default_rng([3, 0x7E47, 0]).permutation(len(texts))[:7]
    second = first[np.random.default_rng([3, 0x7E47, 1]).permutation(7)]
    third = first[np.random.default_rng([3, 0x7E47, 2]).permutation(7)]
    expected_texts = [texts[int(i)] for i in [*first, *second, *third[:2]]]
    ids = tokenizer(expected_texts, add_special_tokens=False, truncation=True, max_length=15)["input_ids"]
    assert [row for row, _ in rows] == [[BOS, *r] for r in ids]
    assert [p for _, p in rows][:8] == [{"epoch": 0, "index": i} for i in range(1, 7)] + [
        {"epoch": 1, "index": 0},
        {"epoch": 1, "index": 1},
    ]


def test_seek_back_inside_the_latest_take_reuses_its_rows(tokenizer, text_file):
    rows = TokenRows(load_texts(DataConfig(dataset=text_file)), tokenizer, 16)
    taken = rows.take(10)
    rows.seek(taken[3][1])  # the harvester hands back rows 4..9 this way
    assert rows.position() == taken[3][1]
    assert rows.take(3) == taken[4:7]
    rows.seek(taken[5][1])
    assert rows.take(4) == taken[6:10]
    with pytest.raises(HarvestError, match="past the end of an epoch of 40"):
        rows.seek({"epoch": 0, "index": 40})
    with pytest.raises(HarvestError, match="set packing True"):
        rows.seek({"epoch": 0, "index": 3, "offset": 2})


# ------------------------------------------------------------------------------------------ streaming


def test_stream_epoch_visits_every_example_once_in_a_seeded_order(tokenizer, text_file):
    texts = [json.loads(line)["text"] for line in Path(text_file).read_text().splitlines()]
    stream = stream_of(text_file)
    rows = TokenRows(stream, tokenizer, 1000)
    assert rows.num_examples is None
    epoch0, epoch1 = rows.take(40), rows.take(40)
    assert epoch0[-1][1] == {"epoch": 1, "index": 0} and epoch1[-1][1] == {"epoch": 2, "index": 0}
    assert [p for _, p in epoch0[:3]] == [{"epoch": 0, "index": i} for i in (1, 2, 3)]
    in_file_order = [[BOS, *ids] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert sorted(r for r, _ in epoch0) == sorted(in_file_order) == sorted(r for r, _ in epoch1)
    assert [r for r, _ in epoch0] != in_file_order  # shuffled through the buffer ...
    assert [r for r, _ in epoch0] != [r for r, _ in epoch1]  # ... differently each epoch
    other_seed = TokenRows(stream, tokenizer, 1000, data_seed=1).take(40)
    assert [r for r, _ in other_seed] != [r for r, _ in epoch0]


@pytest.mark.parametrize("packing", [False, True])
def test_stream_resumes_exactly_mid_epoch_and_across_epochs(tokenizer, text_file, packing):
    stream = stream_of(text_file)
    reference = TokenRows(stream, tokenizer, 16, data_seed=5, packing=packing).take(130)
    assert reference == TokenRows(stream_of(text_file), tokenizer, 16, data_seed=5, packing=packing).take(130)
    epochs = [p["epoch"] for _, p in reference]
    boundary = epochs.index(1)
    for stop in (0, 7, boundary, boundary + 1, epochs.index(2) + 3):
        resumed = TokenRows(stream_of(text_file), tokenizer, 16, data_seed=5, packing=packing)
        resumed.seek(roundtrip(reference[stop][1]))
        assert resumed.take(12) == reference[stop + 1 : stop + 13]


def test_stream_max_examples_caps_every_epoch_to_the_same_examples(tokenizer, text_file):
    rows = TokenRows(stream_of(text_file), tokenizer, 1000, max_examples=10)
    epochs = [rows.take(10) for _ in range(3)]
    assert [e[-1][1] for e in epochs] == [{"epoch": k, "index": 0} for k in (1, 2, 3)]
    assert sorted(r for r, _ in epochs[0]) == sorted(r for r, _ in epochs[1]) == sorted(r for r, _ in epochs[2])
    assert len({tuple(r) for r, _ in epochs[0]}) == 10


def test_stream_errors_name_the_problem(tmp_path, text_file):
    with pytest.raises(HarvestError, match=r"text_field='body' is not a column .* \['text', 'id'\]"):
        load_texts(DataConfig(dataset=text_file, streaming=True, text_field="body"))
    with pytest.raises(HarvestError, match="offline"):
        load_texts(DataConfig(dataset="no-such-org/no-such-dataset", streaming=True))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(HarvestError, match="no examples|cannot read"):
        load_texts(DataConfig(dataset=str(empty), streaming=True))
    with pytest.raises(HarvestError, match="set streaming False"):
        DataConfig(dataset=MEDICAL_QA_DATASET, streaming=True)
    with pytest.raises(HarvestError, match="shuffle_buffer"):
        DataConfig(shuffle_buffer=0)


# ------------------------------------------------------------------------------------------ packing


def pack_reference(examples: list[list[int]], budget: int) -> list[list[int]]:
    """The packing rule written plainly: tokens, EOS after each example unless it would open a row."""
    rows, row = [], []
    for tokens in filter(None, examples):
        for i, token in enumerate([*tokens, EOS]):
            if i == len(tokens) and not row:
                continue
            row.append(token)
            if len(row) == budget:
                rows.append([BOS, *row])
                row = []
    return rows


def test_packed_rows_are_full_and_hold_the_examples_in_order(tokenizer, text_file):
    texts = load_texts(DataConfig(dataset=text_file))
    rows = TokenRows(texts, tokenizer, 16, data_seed=2, packing=True).take(60)
    examples = examples_in_order(texts, tokenizer, 80, data_seed=2)
    assert [row for row, _ in rows] == pack_reference(examples, 15)[:60]
    assert all(len(row) == 16 and row[0] == BOS and BOS not in row[1:] and row[1] != EOS for row, _ in rows)
    flat = [t for row, _ in rows for t in row[1:]]
    content = [t for t in flat if t != EOS]
    assert content == [t for tokens in examples for t in tokens][: len(content)]
    positions = [p for _, p in rows]
    assert any(p["offset"] > 0 for p in positions) and {"epoch", "index", "offset"} == set(positions[0])
    assert any(p["epoch"] == 1 for p in positions)  # the stream ran into the second epoch


def test_packed_stream_resumes_mid_example(tokenizer, text_file):
    texts = load_texts(DataConfig(dataset=text_file))
    reference = TokenRows(texts, tokenizer, 16, packing=True).take(70)
    mid = [k for k, (_, p) in enumerate(reference) if p["offset"] > 0]
    for stop in (mid[0], mid[len(mid) // 2], 0, 1):
        resumed = TokenRows(texts, tokenizer, 16, packing=True)
        resumed.seek(roundtrip(reference[stop][1]))
        assert resumed.take(8) == reference[stop + 1 : stop + 9]


def test_packing_a_dataset_of_empty_examples_fails_instead_of_spinning(tokenizer):
    with pytest.raises(HarvestError, match="every example is empty"):
        TokenRows(["", ""], tokenizer, 16, packing=True).take(1)


# ------------------------------------------------------------------------------------------ medical QA

MEDQA = {
    "id": "q1",
    "data": {
        "Question": "A 23-year-old woman has dysuria. Which drug is best?",
        "Options": {"A": "Ampicillin", "B": "Ceftriaxone", "C": "Doxycycline", "D": "Nitrofurantoin"},
        "Correct Answer": "Nitrofurantoin",
        "Correct Option": "D",
    },
    "subject_name": "",
}
MEDMCQA = {
    "id": "m1",
    "question": "Which of the following is not true for myelinated nerve fibers:",
    "opa": "Impulse through myelinated fibers is slower",
    "opb": "Membrane currents are generated at nodes",
    "opc": "Saltatory conduction is seen",
    "opd": "Local anesthesia is effective",
    "cop": 0,
    "choice_type": "single",
    "exp": "Conduction is faster in myelinated fibers.",
    "subject_name": "Physiology",
    "topic_name": None,
}
PUBMEDQA = {
    "id": "p1",
    "data": {
        "Context": ["Statins have pleiotropic effects.", "We studied 200 patients."],
        "Question": "Do preoperative statins reduce atrial fibrillation?",
        "Options": {"A": "yes", "B": "no", "C": "maybe"},
        "Correct Answer": "yes",
        "Correct Option": "A",
        "Long Answer": "Preoperative statins reduce atrial fibrillation after surgery.",
    },
}
MMLU = {
    "id": "u1",
    "data": {
        "Question": "Which vessel supplies the SA node?",
        "Options": {"A": "Right coronary artery", "B": "Left circumflex", "C": "Aorta", "D": "Vena cava"},
        "Correct Answer": "Right coronary artery",
        "Correct Option": "A",
    },
    "subject_name": "anatomy",
}


def test_each_schema_is_formatted_as_question_options_answer_explanation():
    assert format_mcq(MEDQA) == (
        "A 23-year-old woman has dysuria. Which drug is best?\nThe options are:\nA. Ampicillin\nB. Ceftriaxone\n"
        "C. Doxycycline\nD. Nitrofurantoin\nCorrect option: D. Nitrofurantoin"
    )
    assert format_medmcqa(MEDMCQA) == (
        "Which of the following is not true for myelinated nerve fibers:\nThe options are:\n"
        "A. Impulse through myelinated fibers is slower\nB. Membrane currents are generated at nodes\n"
        "C. Saltatory conduction is seen\nD. Local anesthesia is effective\n"
        "Correct option: A. Impulse through myelinated fibers is slower\n"
        "Explanation: Conduction is faster in myelinated fibers."
    )
    no_explanation = format_medmcqa({**MEDMCQA, "exp": None, "cop": 2})
    assert no_explanation.endswith("\nCorrect option: C. Saltatory conduction is seen")
    assert format_pubmedqa(PUBMEDQA) == (
        "Statins have pleiotropic effects.\nWe studied 200 patients.\n"
        "Do preoperative statins reduce atrial fibrillation?\nThe options are:\nA. yes\nB. no\nC. maybe\n"
        "Correct option: A. yes\nLong answer: Preoperative statins reduce atrial fibrillation after surgery."
    )
    assert format_mcq(MMLU) == (
        "Which vessel supplies the SA node?\nThe options are:\nA. Right coronary artery\nB. Left circumflex\n"
        "C. Aorta\nD. Vena cava\nCorrect option: A. Right coronary artery"
    )
    # A parquet struct lists every letter any row has: missing ones are None. No letter: found from the text.
    sparse = {"data": {**MMLU["data"], "Options": {**MMLU["data"]["Options"], "E": None}, "Correct Option": None}}
    assert format_mcq(sparse) == format_mcq(MMLU)
    assert [(s.folder, s.split) for s in SOURCES] == [
        ("medqa", "train"),
        ("medmcqa", "train"),
        ("pubmedqa", "train"),
        ("mmlu_college_medicine", "test"),
        ("mmlu_clinical_knowledge", "test"),
        ("mmlu_professional_medicine", "test"),
    ]
    assert [s.format for s in SOURCES] == [format_mcq, format_medmcqa, format_pubmedqa, *[format_mcq] * 3]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def medical_mirror(root):
    """A tiny local copy of the six datasets in their hub schemas and the layouts a download gives."""

    def numbered(row, i, key="Question"):
        if "data" in row:
            return {**row, "id": f"{row['id']}-{i}", "data": {**row["data"], key: f"{row['data'][key]} ({i})"}}
        return {**row, "id": f"{row['id']}-{i}", "question": f"{row['question']} ({i})"}

    write_jsonl(root / "medqa" / "train.jsonl", [numbered(MEDQA, i) for i in range(3)])
    write_jsonl(root / "medqa" / "test.jsonl", [numbered(MEDQA, 99)])  # another split: not read
    rows = [numbered(MEDMCQA, 0), {**numbered(MEDMCQA, 1), "exp": None}]
    (root / "medmcqa" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "medmcqa" / "data" / "train-00000-of-00001.parquet")
    write_jsonl(root / "pubmedqa" / "train.jsonl", [numbered(PUBMEDQA, i) for i in range(2)])
    write_jsonl(root / "mmlu_college_medicine" / "test.jsonl", [numbered(MMLU, 0)])
    write_jsonl(root / "mmlu_clinical_knowledge" / "rows.jsonl", [numbered(MMLU, 1)])  # names no split: all read
    write_jsonl(root / "mmlu_professional_medicine" / "test.jsonl", [numbered(MMLU, i) for i in (2, 3)])
    return 3 + 2 + 2 + 1 + 1 + 2


def test_medical_qa_mixture_loads_from_a_local_mirror(tmp_path, tokenizer):
    total = medical_mirror(tmp_path)
    texts = load_texts(DataConfig(dataset=MEDICAL_QA_DATASET, data_dir=str(tmp_path), context_size=64))
    assert len(texts) == total
    listed = list(texts)
    assert listed[0] == format_mcq({"data": {**MEDQA["data"], "Question": MEDQA["data"]["Question"] + " (0)"}})
    assert sum("(99)" in t for t in listed) == 0
    assert sum(t.startswith("Statins have") for t in listed) == 2
    assert sum("Explanation: Conduction" in t for t in listed) == 1  # the other medmcqa row has no explanation
    assert texts[-1] == listed[-1] and texts[1:3] == listed[1:3]
    rows = TokenRows(texts, tokenizer, 64, data_seed=1)
    assert rows.num_examples == total and len(rows.take(total + 3)) == total + 3


def test_medical_qa_without_hub_or_data_dir_says_to_pass_data_dir(tmp_path):
    with pytest.raises(HarvestError, match=r"openlifescienceai/medqa .*--data-dir"):
        load_texts(DataConfig(dataset=MEDICAL_QA_DATASET))
    medical_mirror(tmp_path)
    with pytest.raises(HarvestError, match="is not a folder"):
        load_texts(DataConfig(dataset=MEDICAL_QA_DATASET, data_dir=str(tmp_path / "missing")))
    shutil.rmtree(tmp_path / "pubmedqa")
    with pytest.raises(HarvestError, match=r"no folder .*pubmedqa for openlifescienceai/pubmedqa"):
        load_texts(DataConfig(dataset=MEDICAL_QA_DATASET, data_dir=str(tmp_path)))
    write_jsonl(tmp_path / "pubmedqa" / "test.jsonl", [PUBMEDQA])
    with pytest.raises(HarvestError, match="no file of the train split"):
        load_texts(DataConfig(dataset=MEDICAL_QA_DATASET, data_dir=str(tmp_path)))
    write_jsonl(tmp_path / "pubmedqa" / "train.jsonl", [{"id": "x", "question": "flat, not nested"}])
    with pytest.raises(HarvestError, match="does not have the hub's schema"):
        load_texts(DataConfig(dataset=MEDICAL_QA_DATASET, data_dir=str(tmp_path)))
    with pytest.raises(HarvestError, match="data_dir is read only by"):
        DataConfig(dataset="notes.jsonl", data_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------ prefetch


def walk(rows: TokenRows) -> list:
    """A fixed mix of takes and seeks, the harvester's among them (hand rows back, re-read a fill)."""
    out = []
    fill_start = rows.position()
    for n in (1, 7, 64, 3, 100, 16):
        taken = rows.take(n)
        out.append(taken)
        rows.seek(taken[len(taken) // 2][1])  # hand the second half back
    rows.seek(fill_start)  # re-harvest from an old position: restarts the producer
    out.append(rows.take(20))
    return out


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("streaming", [False, True])
def test_prefetch_gives_the_rows_of_no_prefetch(tokenizer, text_file, packing, streaming):
    cfg = DataConfig(
        dataset=text_file, context_size=16, data_seed=4, packing=packing, streaming=streaming, shuffle_buffer=8
    )
    plain, ahead = token_rows(cfg, tokenizer, prefetch=False), token_rows(cfg, tokenizer, prefetch=True)
    assert walk(ahead) == walk(plain)
    ahead.close()


def tokenize_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "saekit-tokenize"]


def test_prefetch_thread_starts_on_take_restarts_on_seek_and_stops_on_close(tokenizer, text_file):
    assert not tokenize_threads()
    texts = load_texts(DataConfig(dataset=text_file))
    reference = TokenRows(texts, tokenizer, 16).take(400)
    rows = TokenRows(texts, tokenizer, 16, prefetch=True)
    assert not tokenize_threads()  # nothing starts at construction
    assert rows.take(5) == reference[:5]
    assert len(tokenize_threads()) == 1
    time.sleep(0.05)  # let it run ahead and fill its queue
    rows.seek(reference[300][1])  # far outside what it produced: stop it ...
    assert not tokenize_threads()
    assert rows.take(50) == reference[301:351]  # ... and restart there
    rows.seek(reference[9][1])
    assert rows.take(10) == reference[10:20]
    rows.close()
    assert not tokenize_threads()


class Exploding(Sequence):
    def __init__(self, texts, bad):
        self.texts, self.bad = texts, bad

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        if i == self.bad:
            raise KeyError(f"example {i} is unreadable")
        return self.texts[i]


def test_an_error_in_the_prefetch_thread_is_raised_by_take(tokenizer, text_file):
    texts = list(load_texts(DataConfig(dataset=text_file))) * 5
    reference = TokenRows(texts, tokenizer, 16).take(150)
    bad = int(np.random.default_rng([0, 0x7E47, 0]).permutation(len(texts))[140])  # in the third chunk
    rows = TokenRows(Exploding(texts, bad), tokenizer, 16, prefetch=True)
    taken = []
    with pytest.raises(KeyError, match="unreadable"):
        while True:
            taken += rows.take(7)
    assert len(taken) == 128 // 7 * 7 and taken == reference[: len(taken)]  # all the takes before the bad chunk
    assert not tokenize_threads()
    with pytest.raises(KeyError, match="unreadable"):  # a later take restarts the producer, and meets it again
        rows.take(7)
    rows.close()


def test_prefetcher_order_errors_and_close():
    def numbers():
        yield from range(5)
        raise ValueError("broken source")

    prefetcher = Prefetcher(numbers, depth=2)
    assert [next(prefetcher) for _ in range(5)] == list(range(5))
    with pytest.raises(ValueError, match="broken source"):
        next(prefetcher)
    endless = Prefetcher(lambda: iter(range(10**9)), depth=2)
    assert not endless.running
    assert next(endless) == 0
    time.sleep(0.02)  # the producer is now blocked on its full queue
    start = time.monotonic()
    endless.close()
    assert not endless.running and time.monotonic() - start < 1
    with pytest.raises(StopIteration):
        next(endless)


def test_harvester_batches_are_identical_with_prefetched_rows(tiny_model, text_file):
    def harvester(prefetch):
        data = DataConfig(dataset=text_file, context_size=16, max_examples=12)
        h = Harvester(
            ModelConfig(model=tiny_model, layer=2),
            data,
            BufferConfig(buffer_tokens=64, forward_batch_rows=4, passes=1),
            batch_size=16,
            progress=False,
        )
        h.rows = token_rows(data, h.tokenizer, prefetch=prefetch)
        return h

    iterator = iter(harvester(True))
    batches = [next(iterator) for _ in range(10)]
    reference = iter(harvester(False))
    assert all(torch.equal(batch, next(reference)) for batch in batches)
