"""The built-in offline text sources and how they are packed into rows."""

from harvest.documents import CHARS_PER_TOKEN, icd10_documents, pack, pydoc_documents


def test_pack_fills_each_document_to_the_budget_and_keeps_the_order():
    units = [f"unit {i} " + "x" * (i % 7) for i in range(200)]
    budget = CHARS_PER_TOKEN * (9 - 1)
    docs = pack(units, context_size=9)
    assert "\n".join(docs).split("\n") == units
    for doc in docs[:-1]:
        sizes = [len(line) + 1 for line in doc.split("\n")]
        assert sum(sizes) >= budget > sum(sizes[:-1])  # the budget is reached with the last unit, not before


def test_offline_sources_are_real_text_of_the_right_size():
    medical, prose = icd10_documents(128), pydoc_documents(128)
    assert len(medical) > 10_000 and medical[0].startswith("A00")
    assert len(prose) > 500
    assert sum(" the " in doc for doc in prose) > 0.9 * len(prose)  # English prose, not code listings
    budget = CHARS_PER_TOKEN * 127
    assert sum(len(d) >= budget for d in prose) > 0.9 * len(prose)
