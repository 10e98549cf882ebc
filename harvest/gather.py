"""The collectives of data-parallel harvesting: the global batch from every rank's batch, and the run's data
position from every rank's harvester position.

Each rank harvests its own forward groups (harvest/shard.py) and delivers its own batches [b, D] (or
[b, L, D]); `GatheredBatches` all-gathers them so that every rank sees the same global batch [world * b, D],
rank 0's tokens first. The ranks must iterate in lockstep: each global batch is one collective.

A data position is {"world": W, "ranks": [rank 0's harvester state, ..., rank W-1's]}, the same on every rank
(`data_position`); `restore_data_position` gives each rank of a resumed run the state to load into its
harvester, exactly where it was on the same world size, and per the documented policy on another.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from .errors import HarvestError

_HARVESTER_KEYS = {"segment", "cursor", "pass", "batch"}
"""The keys of one harvester's state (Harvester.state_dict)."""

_MAX_DIMS = 8
"""Dimensions of a batch that the first gather's shape check can describe."""


def _require_process_group(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise HarvestError(
            f"{what} is a torch.distributed collective, but no process group is initialised: launch with torchrun "
            "and call torch.distributed.init_process_group() first (or use the harvester alone in one process)"
        )


class GatheredBatches:
    """Iterate for global batches [world * b, ...]: each rank's next batch [b, ...] of `source` (a Harvester),
    all-gathered over `group` (None: the default process group) in rank order, on the batch's device.

    Every rank gets the same tensor, so the ranks train on the same global batch. state_dict() and
    load_state_dict() are the source's own (this rank's position, no collective); collect every rank's with
    data_position. bytes_gathered counts what this rank received from the others, (world - 1) * b * row bytes
    per batch: the traffic of the gather, which a bandwidth figure divides.
    """

    def __init__(
        self, source: Iterable[torch.Tensor], group: dist.ProcessGroup | None = None, every_rank_position: bool = False
    ):
        """every_rank_position: state_dict() returns data_position of every rank (a collective: the ranks must
        ask in lockstep, as they iterate), so whichever rank saves a checkpoint holds the whole run's position
        (a sweep whose members live on different ranks)."""
        _require_process_group("GatheredBatches")
        self.source, self.group, self.every_rank_position = source, group, every_rank_position
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        shard = getattr(source, "shard", None)
        if shard is not None and (shard.rank, shard.world) != (self.rank, self.world):
            raise HarvestError(
                f"the source harvests as rank {shard.rank} of {shard.world}, but gathers as rank {self.rank} of "
                f"{self.world} in the process group: the global batch would not hold each group of the stream once. "
                "Build the harvester with shard=Shard(rank, world) of the same process group"
            )
        if hasattr(source, "gathered"):
            source.gathered = True  # a Harvester that sharded itself from the environment warns unless gathered
        self.bytes_gathered = 0
        self._checked = False

    @property
    def d_in(self) -> int:
        return self.source.d_in  # type: ignore[attr-defined]

    def metadata(self, *args, **kwargs) -> dict:
        return self.source.metadata(*args, **kwargs)  # type: ignore[attr-defined]

    def stats(self) -> dict[str, int]:
        """The source's counts (this rank's harvest) and the bytes this rank has received in gathers."""
        source_stats = getattr(self.source, "stats", None)
        return {**(source_stats() if callable(source_stats) else {}), "bytes_gathered": self.bytes_gathered}

    def state_dict(self) -> dict:
        local = self.source.state_dict()  # type: ignore[attr-defined]
        return data_position(local, self.group) if self.every_rank_position else local

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)  # type: ignore[attr-defined]

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if callable(close):
            close()

    def __iter__(self) -> Iterator[torch.Tensor]:
        for local in self.source:
            local = local.contiguous()
            if not self._checked:
                self._check_same_batches(local)
                self._checked = True
            out = torch.empty((self.world * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
            _all_gather_single(out, local, self.group)
            self.bytes_gathered += (self.world - 1) * local.numel() * local.element_size()
            yield out

    def _check_same_batches(self, local: torch.Tensor) -> None:
        """Refuse (on every rank, with every rank's shape) batches that differ across ranks, which the gather
        itself would fail on obscurely or hang at."""
        if local.dim() > _MAX_DIMS:
            raise HarvestError(f"a batch of {local.dim()} dimensions cannot be gathered: at most {_MAX_DIMS}")
        shape = [local.dim(), local.element_size(), int(local.is_floating_point()), *local.shape]
        mine = torch.tensor(shape + [0] * (3 + _MAX_DIMS - len(shape)), dtype=torch.int64, device=local.device)
        every = torch.empty(self.world * len(mine), dtype=torch.int64, device=local.device)
        _all_gather_single(every, mine, self.group)  # the concatenation: gloo does not gather into a stack
        every = every.view(self.world, len(mine))
        if not (every == mine).all():
            shapes = ", ".join(
                f"rank {r}: {tuple(row[3 : 3 + row[0]])} of {row[1]}-byte elements"
                for r, row in enumerate(every.tolist())
            )
            raise HarvestError(
                f"the ranks' batches differ ({shapes}): every rank must harvest with the same configs and the same "
                "per-rank batch size (Shard.local_batch_size of the global batch)"
            )


def _all_gather_single(out: torch.Tensor, local: torch.Tensor, group) -> None:
    """out [world * n, ...] = every rank's local [n, ...] in rank order (torch >= 2.13 names it
    all_gather_single; older versions, as on the GPU machine, all_gather_into_tensor)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local, group=group)


def data_position(local: dict, group: dist.ProcessGroup | None = None) -> dict:
    """The run's data position {"world": W, "ranks": [every rank's harvester state, in rank order]}, returned
    on every rank. A collective: every rank of `group` calls it with its own state (Harvester.state_dict, or
    the position BatchStream recorded after the last batch trained on); with NCCL, after
    torch.cuda.set_device(local rank), as for any object collective. JSON-able when the states are."""
    _require_process_group("data_position")
    states: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, local, group=group)
    return {"world": len(states), "ranks": states}


def restore_data_position(position: dict, rank: int, world: int) -> dict:
    """The harvester state rank `rank` of a run of `world` ranks loads (Harvester.load_state_dict) to resume
    from `position`: one written by data_position, or one harvester's own state (a run of one process).

    Same world size: each rank continues exactly where the same rank was, so the global batches continue bit
    for bit. Another world size: no rank can continue exactly (each old rank had delivered a shuffled part of
    the segment in its buffer, and the rounds of forward groups are cut by the world size), so every rank
    restarts at the earliest unfinished position: the start of the oldest round of forward groups that an old
    rank was still harvesting, dealt anew over `world` ranks. Everything before it had been delivered, so
    nothing is dropped; what the old ranks had delivered from there on is delivered again, and a warning says
    what (none when nothing was, e.g. for a position saved before any batch).
    """
    if not 0 <= rank < world:
        raise HarvestError(f"rank={rank} lies outside a world of {world} ranks (0 to {world - 1})")
    states = _rank_states(position)
    if len(states) == world:
        return states[rank]
    earliest = min((s["cursor"]["group_start"] for s in states), key=_stream_order)
    delivered = [
        f"rank {r}: {_delivered_after(state, earliest)}"
        for r, state in enumerate(states)
        if _delivered_after(state, earliest)
    ]
    if delivered:
        warnings.warn(
            f"the data position was saved by {len(states)} data-parallel rank(s) and this run has {world}: a run "
            f"continues exactly only on as many ranks as saved it, so every rank restarts at the earliest "
            f"unfinished position, {_describe(earliest)} (the oldest round of forward groups an old rank was still "
            "harvesting). Nothing is dropped, but what the old ranks had delivered from there on is delivered "
            f"again: {'; '.join(delivered)}. Resume on {len(states)} rank(s) to continue exactly.",
            stacklevel=2,
        )
    segment = max(int(s["segment"]) for s in states) + 1  # fresh shuffle seeds: no segment repeats a permutation
    return {"segment": segment, "cursor": {"group_start": dict(earliest), "skip": 0}, "pass": 0, "batch": 0}


def _rank_states(position: dict) -> list[dict]:
    """Every old rank's harvester state, checked to be complete."""
    if not isinstance(position, dict):
        raise HarvestError(f"a data position is a dict, not {type(position).__name__}: pass what data_position gave")
    if set(position) == {"world", "ranks"}:
        states = list(position["ranks"])
        if len(states) != position["world"] or not states:
            raise HarvestError(
                f"the data position says world={position['world']} but holds {len(states)} rank state(s): it is "
                "damaged; start a new run"
            )
    elif set(position) == _HARVESTER_KEYS:
        states = [position]  # a single process's harvester
    else:
        raise HarvestError(
            f"this data position has keys {sorted(position)}: neither a data-parallel position ['ranks', 'world'] "
            f"nor a harvester's {sorted(_HARVESTER_KEYS)}; it was written by another version and cannot be continued"
        )
    for r, state in enumerate(states):
        if not isinstance(state, dict) or set(state) != _HARVESTER_KEYS:
            raise HarvestError(
                f"rank {r}'s part of the data position is {state!r}, not a harvester state with keys "
                f"{sorted(_HARVESTER_KEYS)}: it was written by another version and cannot be continued"
            )
    return states


def _stream_order(position: dict) -> tuple[int, int, int]:
    """A token-stream position {"epoch", "index"[, "offset"]} as a key that sorts in stream order."""
    try:
        return int(position["epoch"]), int(position["index"]), int(position.get("offset", 0))
    except (KeyError, TypeError, ValueError) as e:
        raise HarvestError(
            f"cannot order the token-stream position {position!r}: restoring on another world size needs "
            "positions {'epoch', 'index'[, 'offset']}"
        ) from e


def _describe(position: dict) -> str:
    epoch, index, offset = _stream_order(position)
    return f"epoch {epoch}, example {index}" + (f", token {offset}" if offset else "")


def _delivered_after(state: dict, earliest: dict) -> str:
    """What one old rank had delivered at or after `earliest` (its restart point), in words; "" for nothing."""
    start, skip = state["cursor"]["group_start"], int(state["cursor"]["skip"])
    parts = []
    if _stream_order(start) != _stream_order(earliest):
        parts.append(f"its forward groups from there up to the round at {_describe(start)}")
    if skip:
        parts.append(f"{skip} token(s) of its group in that round")
    if int(state["pass"]) or int(state["batch"]):
        parts.append(f"the part of the segment in its buffer before batch {state['batch']} of pass {state['pass']}")
    return ", ".join(parts)
