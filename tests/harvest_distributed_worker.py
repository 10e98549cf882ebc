"""Worker of tests/test_harvest_distributed.py, launched by tests/torchrun.py on gloo: each rank harvests its
share of the forward groups from the tiny model and writes what it saw under OUT for the test to check.

    python -m torch.distributed.run ... tests/harvest_distributed_worker.py MODEL TEXT OUT {fresh,reshard}

fresh (any world): GLOBAL_BATCH-token global batches, gathered; the data position after STOP of them, then
TOTAL of them uninterrupted, then a new harvester resumed from the saved position (JSON round trip).
reshard: a new harvester restored from the position a `fresh` run saved on another world size, then
RESHARD_BATCHES global batches.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from harvest import BufferConfig, DataConfig, Harvester, HarvestError, ModelConfig
from harvest.gather import GatheredBatches, data_position, restore_data_position
from harvest.shard import Shard

GLOBAL_BATCH = 12
"""Divides over 2 and 3 ranks: 6 tokens per rank (segments of 30) or 4 (segments of 32)."""
STOP, TOTAL = 22, 30
"""fresh: the position is saved after STOP global batches, inside a segment (the fifth, at 2 ranks), where the
ranks' cursors lie in different rounds of forward groups; TOTAL is six whole segments per rank at 2 ranks."""
RESHARD_BATCHES = 16


def configs(model: str, text: str) -> tuple[ModelConfig, DataConfig, BufferConfig]:
    """The harvest the worker and the test's single-process reference share."""
    return (
        ModelConfig(model=model, layer=2),
        DataConfig(dataset=text, context_size=16),
        BufferConfig(buffer_tokens=64, forward_batch_rows=3, passes=1),
    )


def harvester(model: str, text: str, shard: Shard, lm=None) -> Harvester:
    model_cfg, data_cfg, buffer_cfg = configs(model, text)
    batch = shard.local_batch_size(GLOBAL_BATCH)
    return Harvester(model_cfg, data_cfg, buffer_cfg, batch_size=batch, lm=lm, progress=False)  # shard from env


def take(batches: GatheredBatches, n: int) -> list[torch.Tensor]:
    iterator = iter(batches)
    return [next(iterator) for _ in range(n)]


def fresh(model: str, text: str, out: Path, shard: Shard) -> dict:
    first = harvester(model, text, shard)
    assert first.shard == shard, f"the harvester sharded itself as {first.shard}, torchrun says {shard}"
    gathered = GatheredBatches(first)
    iterator = iter(gathered)
    batches = [next(iterator) for _ in range(STOP)]
    position = data_position(gathered.state_dict())
    batches += [next(iterator) for _ in range(TOTAL - STOP)]
    gathered.close()
    if shard.rank == 0:
        (out / "position.json").write_text(json.dumps(position))
    dist.barrier()
    saved = json.loads((out / "position.json").read_text())
    resumed = GatheredBatches(harvester(model, text, shard, lm=(first.model, first.tokenizer)))
    resumed.load_state_dict(restore_data_position(saved, shard.rank, shard.world))
    rest = take(resumed, TOTAL - STOP)
    resumed.close()
    try:  # batches of another shape on each rank: refused on every rank, before the gather itself
        take(GatheredBatches([torch.zeros(2 + shard.rank, 4)]), 1)
        mismatch = None
    except HarvestError as err:
        mismatch = str(err)
    return {
        "mismatch": mismatch,
        "batches": torch.stack(batches),
        "resumed": torch.stack(rest),
        "local_batch": first.batch_size,
        "segment_tokens": first.segment_tokens,
        "bytes_gathered": gathered.bytes_gathered,
        "stats": gathered.stats(),
    }


def reshard(model: str, text: str, out: Path, shard: Shard) -> dict:
    saved = json.loads((out / "position.json").read_text())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = restore_data_position(saved, shard.rank, shard.world)
    h = harvester(model, text, shard)
    gathered = GatheredBatches(h)
    gathered.load_state_dict(state)
    batches = take(gathered, RESHARD_BATCHES)
    gathered.close()
    return {
        "batches": torch.stack(batches),
        "state": state,
        "warnings": [str(w.message) for w in caught],
        "local_batch": h.batch_size,
        "segment_tokens": h.segment_tokens,
    }


def main(model: str, text: str, out: str, mode: str) -> None:
    torch.set_num_threads(1)
    # A harvester that shards itself warns when it is not gathered: here every one is, so that would be a bug.
    warnings.filterwarnings("error", message=".*delivers only this rank's share")
    dist.init_process_group("gloo")
    shard = Shard.from_env()
    run = {"fresh": fresh, "reshard": reshard}[mode]
    result = run(model, text, Path(out), shard)
    torch.save({**result, "rank": shard.rank, "world": shard.world}, Path(out) / f"{mode}-rank{shard.rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
