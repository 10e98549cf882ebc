"""Whether a run's training text reached the held-out examples of `python -m sae eval`."""

import pytest

from sae.evaluation.report import _overlap


def info(dataset="icd10-cm", seed=0, epoch=0, index=300, fill=3, old=False):
    position = (
        {"fill_start": {"epoch": epoch, "index": index}, "fill": fill, "pass": 0, "batch": 0}
        if old
        else {
            "segment": fill,
            "cursor": {"group_start": {"epoch": epoch, "index": index}, "skip": 5},
            "pass": 0,
            "batch": 0,
        }
    )
    return {"config": {"data": {"dataset": dataset, "data_seed": seed}}, "data_position": position}


@pytest.mark.parametrize(
    "run, expected",
    [
        (info(), False),  # read about 300 * 4/3 = 400 examples, held out from 1000
        (info(old=True), False),  # the same, from the older harvester's position
        (info(index=800, old=True), True),
        (info(index=800), True),  # about 1067 examples read: reached 1000
        (info(epoch=1, index=0), True),  # a second epoch has seen everything
        (info(dataset="pydoc-prose", epoch=1), False),  # other text entirely
        (info(seed=1), None),  # another order: cannot tell
        (info(fill=0, index=0), None),  # still in its first fill: unknown reach
        (None, None),  # a params.npz: no training state
    ],
)
def test_overlap(run, expected):
    assert _overlap(run, "icd10-cm", 0, heldout_start=1000) is expected
