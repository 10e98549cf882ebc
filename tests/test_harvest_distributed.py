"""Data-parallel harvesting: the dealing of forward groups to ranks, the gathered global batch, and the data
position across ranks; the multi-process checks run the real torchrun on gloo (tests/torchrun.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from harvest import Harvester, load_lm
from harvest.errors import HarvestError
from harvest.forward import GroupReader
from harvest.gather import GatheredBatches, data_position, restore_data_position
from harvest.shard import Shard
from harvest.text import token_rows
from tests import harvest_distributed_worker as worker
from tests.torchrun import torchrun

WORKER = Path(worker.__file__)


def test_shard_checks_its_rank_and_world():
    assert Shard() == Shard(0, 1)
    with pytest.raises(HarvestError, match="outside a world of 2"):
        Shard(2, 2)
    with pytest.raises(HarvestError, match="at least one rank"):
        Shard(0, 0)


def test_shard_from_torchrun_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert Shard.from_env() == Shard(0, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(HarvestError, match="sets RANK but not WORLD_SIZE"):
        Shard.from_env()
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert Shard.from_env() == Shard(2, 3)
    monkeypatch.setenv("WORLD_SIZE", "three")
    with pytest.raises(HarvestError, match="must be integers"):
        Shard.from_env()


def test_global_batch_splits_evenly_or_is_refused():
    assert [Shard(r, 3).local_batch_size(12) for r in range(3)] == [4, 4, 4]
    assert Shard(0, 1).local_batch_size(7) == 7
    with pytest.raises(
        HarvestError, match=r"batch_size=1000 does not split evenly over 3 .* multiple of 3 \(999 or 1002\)"
    ):
        Shard(1, 3).local_batch_size(1000)
    with pytest.raises(HarvestError, match=r"multiple of 4 \(4\)"):
        Shard(0, 4).local_batch_size(2)


def test_groups_are_dealt_in_rounds(tiny_model, text_file):
    model_cfg, data_cfg, buffer_cfg = worker.configs(tiny_model, text_file)
    model, tokenizer = load_lm(model_cfg)

    def reader(shard):
        rows = token_rows(data_cfg, tokenizer, prefetch=False)
        return GroupReader(model, tokenizer, rows, [2], buffer_cfg.forward_batch_rows, shard=shard)

    alone = reader(Shard())
    single = [alone.next_group() for _ in range(6)]
    assert len({len(g.acts) for g in single}) > 1, "the test needs groups of different sizes"
    for world in (2, 3):
        for rank in range(world):
            mine = reader(Shard(rank, world))
            for k in range(6 // world):
                group = mine.next_group()
                expected = single[k * world + rank]
                assert torch.equal(group.acts, expected.acts), (rank, world, k)  # the same forward, bit for bit
                assert group.start == single[k * world].start  # positions are round starts: resumable per rank
            assert mine.position() == alone.position()  # every rank has read the whole rounds


def test_harvester_shards_itself_under_torchrun(tiny_model, text_file, monkeypatch, recwarn):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    model_cfg, data_cfg, buffer_cfg = worker.configs(tiny_model, text_file)
    sharded = Harvester(model_cfg, data_cfg, buffer_cfg, batch_size=6, progress=False)
    assert sharded.shard == Shard(1, 2) and sharded.describe().endswith("(rank 1 of 2)")
    with pytest.warns(UserWarning, match="delivers only this rank's share of the data. Wrap it in"):
        next(iter(sharded))
    sharded.close()
    lm = (sharded.model, sharded.tokenizer)
    for shard in (Shard(0, 1), Shard.from_env()):  # chosen explicitly: no warning
        explicit = Harvester(model_cfg, data_cfg, buffer_cfg, batch_size=6, lm=lm, progress=False, shard=shard)
        assert explicit.shard == shard
        next(iter(explicit))
        explicit.close()
    assert not [w for w in recwarn.list if "share of the data" in str(w.message)]
    # A data-parallel position: this rank (1 of 2) continues from its own part of it, not rank 0's.
    mine = explicit.state_dict()
    explicit.load_state_dict({"world": 2, "ranks": [{**mine, "batch": mine["batch"] + 1}, mine]})
    assert explicit.state_dict() == mine
    explicit.load_state_dict({"world": 2, "ranks": [mine, {**mine, "batch": mine["batch"] + 1}]})
    assert explicit.state_dict() == {**mine, "batch": mine["batch"] + 1}


def test_gathering_needs_a_process_group():
    with pytest.raises(HarvestError, match="init_process_group"):
        GatheredBatches([torch.zeros(2, 3)])


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of this process alone (torchrun's launches cost seconds; world 1 needs none)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_one_rank_gathers_its_own_batches(one_rank_group):
    batches = [torch.randn(4, 3), torch.randn(4, 2, 3)]
    gathered = GatheredBatches(batches)
    assert all(torch.equal(a, b) for a, b in zip(gathered, batches, strict=True))
    assert gathered.bytes_gathered == 0 and gathered.stats() == {"bytes_gathered": 0}
    assert data_position({"segment": 0}) == {"world": 1, "ranks": [{"segment": 0}]}


def test_a_source_sharded_for_another_group_is_refused(one_rank_group, tiny_model, text_file):
    model_cfg, data_cfg, buffer_cfg = worker.configs(tiny_model, text_file)
    h = Harvester(model_cfg, data_cfg, buffer_cfg, batch_size=6, progress=False, shard=Shard(1, 2))
    with pytest.raises(HarvestError, match="harvests as rank 1 of 2, but gathers as rank 0 of 1"):
        GatheredBatches(h)


def state(epoch, index, skip=0, segment=3, pass_=0, batch=0):
    return {
        "segment": segment,
        "cursor": {"group_start": {"epoch": epoch, "index": index}, "skip": skip},
        "pass": pass_,
        "batch": batch,
    }


def test_same_world_restores_each_rank_exactly():
    position = {"world": 2, "ranks": [state(0, 8, skip=3, batch=2), state(0, 12, batch=2)]}
    assert [restore_data_position(position, r, 2) for r in range(2)] == position["ranks"]
    single = state(1, 4, skip=2, pass_=1, batch=1)  # a one-process harvester's own state: world 1
    assert restore_data_position(single, 0, 1) == single


def test_another_world_restarts_at_the_earliest_unfinished_round_and_says_what_repeats():
    position = {"world": 2, "ranks": [state(1, 8, skip=3, segment=5), state(0, 30, batch=2, segment=4)]}
    for rank in range(3):
        with pytest.warns(UserWarning) as caught:
            restored = restore_data_position(position, rank, 3)
        assert restored == {
            "segment": 6,
            "cursor": {"group_start": {"epoch": 0, "index": 30}, "skip": 0},
            "pass": 0,
            "batch": 0,
        }
        (message,) = [str(w.message) for w in caught]
        assert "saved by 2 data-parallel rank(s) and this run has 3" in message
        assert "earliest unfinished position, epoch 0, example 30" in message
        assert "rank 0: its forward groups from there up to the round at epoch 1, example 8, 3 token(s)" in message
        assert "rank 1: the part of the segment in its buffer before batch 2 of pass 0" in message
        assert "Resume on 2 rank(s) to continue exactly" in message


def test_another_world_without_anything_delivered_again_is_silent(recwarn):
    at_start = {"world": 2, "ranks": [state(0, 0), state(0, 0)]}
    assert restore_data_position(at_start, 1, 3)["cursor"] == {"group_start": {"epoch": 0, "index": 0}, "skip": 0}
    assert not recwarn.list


def test_damaged_or_foreign_positions_are_refused():
    with pytest.raises(HarvestError, match="says world=3 but holds 2"):
        restore_data_position({"world": 3, "ranks": [state(0, 0), state(0, 0)]}, 0, 3)
    with pytest.raises(HarvestError, match="neither a data-parallel position"):
        restore_data_position({"fill": 0}, 0, 1)
    with pytest.raises(HarvestError, match="rank 1's part"):
        restore_data_position({"world": 2, "ranks": [state(0, 0), {"fill": 0}]}, 0, 2)
    with pytest.raises(HarvestError, match="outside a world of 2"):
        restore_data_position(state(0, 0), 2, 2)


# -- under torchrun -----------------------------------------------------------------------------------------


def rank_streams(tiny_model, text_file, world, n_tokens, start=None):
    """Each rank's tokens in document order, [n_tokens, D] per rank, from the single-process forward groups
    (those a one-process harvester fills its segments from) read from `start`: rank r's are the groups r,
    r + world, r + 2 world, ... concatenated."""
    model_cfg, data_cfg, buffer_cfg = worker.configs(tiny_model, text_file)
    model, tokenizer = load_lm(model_cfg)
    rows = token_rows(data_cfg, tokenizer, prefetch=False)
    if start is not None:
        rows.seek(start)
    reader = GroupReader(model, tokenizer, rows, [model_cfg.layer], buffer_cfg.forward_batch_rows)
    groups = []
    while min(sum(len(g) for g in groups[r::world]) for r in range(world)) < n_tokens:
        groups.append(reader.next_group().acts[:, 0])
    return [torch.cat(groups[r::world])[:n_tokens] for r in range(world)]


def sorted_rows(x):
    """The rows of x [N, D] in lexicographic order: equal as multisets iff equal after this."""
    return x[torch.from_numpy(np.lexsort(x.numpy().T[::-1]))]


def rank_slices(batches, rank, local_batch):
    """Rank `rank`'s part of each global batch [n, B, D], in delivery order: [n * local_batch, D]."""
    return batches[:, rank * local_batch : (rank + 1) * local_batch].reshape(-1, batches.shape[-1])


@pytest.fixture(scope="module")
def fresh_run(tiny_model, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("harvest-dp")
    torchrun(2, WORKER, tiny_model, text_file, str(out), "fresh", timeout=240)
    return out, [torch.load(out / f"fresh-rank{r}.pt") for r in range(2)]


def test_two_ranks_deliver_every_token_once_in_one_global_batch(tiny_model, text_file, fresh_run):
    _, results = fresh_run
    batches = results[0]["batches"]
    b, segment = results[0]["local_batch"], results[0]["segment_tokens"]
    assert b == 6 and segment == 30 and batches.shape == (worker.TOTAL, 12, 32)
    assert torch.equal(results[1]["batches"], batches), "every rank must see the same global batch"
    for result in results:
        assert "rank 0: (2, 4) of 4-byte elements, rank 1: (3, 4) of 4-byte elements" in result["mismatch"]
    segments = worker.TOTAL * b // segment
    assert segments * segment == worker.TOTAL * b, "the test compares whole segments"
    streams = rank_streams(tiny_model, text_file, 2, segments * segment)
    for rank in range(2):
        delivered = rank_slices(batches, rank, b)
        for k in range(segments):  # each segment: the next `segment` tokens of the rank's groups, shuffled
            here = slice(k * segment, (k + 1) * segment)
            assert torch.equal(sorted_rows(delivered[here]), sorted_rows(streams[rank][here])), (rank, k)
        assert not torch.equal(delivered[:segment], streams[rank][:segment])  # shuffled, not document order
    # The ranks' groups partition the single-process groups, so together they deliver each token once.
    assert results[0]["bytes_gathered"] == worker.TOTAL * b * 32 * 4 and results[0]["stats"]["bytes_gathered"] > 0


def test_two_ranks_resume_the_identical_global_batches(fresh_run):
    out, results = fresh_run
    position = json.loads((out / "position.json").read_text())
    assert position["world"] == 2 and len(position["ranks"]) == 2
    starts = [rank["cursor"]["group_start"] for rank in position["ranks"]]
    assert starts[0] != starts[1], "the test needs ranks in different rounds of forward groups when it stops"
    for result in results:
        assert torch.equal(result["resumed"], result["batches"][worker.STOP :])


def test_three_ranks_restart_a_two_rank_position_at_its_earliest_round(tiny_model, text_file, fresh_run):
    out, _ = fresh_run
    position = json.loads((out / "position.json").read_text())
    torchrun(3, WORKER, tiny_model, text_file, str(out), "reshard", timeout=240)
    results = [torch.load(out / f"reshard-rank{r}.pt") for r in range(3)]
    starts = [s["cursor"]["group_start"] for s in position["ranks"]]
    earliest = min(starts, key=lambda p: (p["epoch"], p["index"]))
    for result in results:
        assert result["state"]["cursor"] == {"group_start": earliest, "skip": 0}
        (message,) = result["warnings"]
        assert "saved by 2 data-parallel rank(s) and this run has 3" in message and "delivered again" in message
        assert torch.equal(result["batches"], results[0]["batches"])
    b, segment = results[0]["local_batch"], results[0]["segment_tokens"]
    assert b == 4 and segment == 32
    streams = rank_streams(tiny_model, text_file, 3, 2 * segment, start=earliest)
    for rank in range(3):
        delivered = rank_slices(results[0]["batches"], rank, b)
        for k in range(2):
            here = slice(k * segment, (k + 1) * segment)
            assert torch.equal(sorted_rows(delivered[here]), sorted_rows(streams[rank][here])), (rank, k)
