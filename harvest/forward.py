"""Forward groups: the token stream cut into fixed groups of rows, each run through the truncated LM once.

A group is the next `rows_per_forward` non-empty rows of the token stream, right-padded to its longest
row. Groups depend only on the stream, never on how the activations are later cut into buffer segments,
so a segment boundary inside a group is resumable bit for bit: seek to the group's start, run the same
forward again, skip the tokens already delivered.

Under data parallelism (harvest/shard.py) the groups are dealt in rounds of `world`: a reader reads the rows
of a whole round and runs the forward on its rank's group only. Its positions are then round starts, and a
round is cut into the same groups wherever it is read from, so the resume above holds per rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .activations import keep_mask, layer_activations, norm_outliers
from .errors import HarvestError
from .nonfinite import NonFiniteFilter
from .shard import Shard

_MAX_EMPTY_ROWS = 100_000
"""Consecutive rows without a harvestable token after which a stream (of unknown length) counts as empty."""


class Group(NamedTuple):
    start: dict  # token-stream position before the first row of the group's round (its own first row when world=1)
    acts: torch.Tensor  # [n, L, D] kept tokens in document order, on the model's device


class GroupReader:
    """Reads the token stream group by group; `seek` re-positions it at a group's start (a round's start, with
    a shard of several ranks). With `shard`, next_group reads a round of shard.world groups and returns the
    activations of the shard.rank-th; the other rows are only tokenised, never run through the model."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        rows,
        layers: Sequence[int],
        rows_per_forward: int,
        exclude_special_tokens: bool = True,
        norm_outlier_factor: float | None = None,
        nonfinite: NonFiniteFilter | None = None,
        shard: Shard | None = None,
    ):
        """shard: which group of each round to run (None: Shard(0, 1), every group)."""
        self.model, self.tokenizer, self.rows = model, tokenizer, rows
        self.shard = shard if shard is not None else Shard()
        self.layers, self.rows_per_forward = list(layers), rows_per_forward
        self.exclude_special_tokens, self.norm_outlier_factor = exclude_special_tokens, norm_outlier_factor
        self._special = set(tokenizer.all_special_ids) if exclude_special_tokens else set()
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = next(model.parameters()).device
        self.nonfinite = nonfinite if nonfinite is not None else NonFiniteFilter(1.0)

    def position(self) -> dict:
        return self.rows.position()

    def seek(self, position: dict) -> None:
        self.rows.seek(position)

    def next_group(self) -> Group:
        start = self.rows.position()
        for turn in range(self.shard.world):  # every rank reads the whole round: the groups are the same on all
            rows = self._next_rows()
            if self.shard.owns(turn):
                mine = rows
        return Group(start, self._forward(mine))

    def _next_rows(self) -> list[list[int]]:
        """The token rows of the next group: the next rows_per_forward rows holding a harvestable token."""
        rows, empty = [], 0
        while len(rows) < self.rows_per_forward:
            for row, _ in self.rows.take(self.rows_per_forward - len(rows)):
                if any(t not in self._special for t in row):
                    rows.append(row)  # a row of special tokens only would cost a forward and give nothing
                    empty = 0
                else:
                    empty += 1
            known = getattr(self.rows, "num_examples", None)
            if not rows and empty > (known or _MAX_EMPTY_ROWS):
                raise HarvestError("the dataset yields no tokens to harvest: every example is empty")
        return rows

    def _forward(self, rows: list[list[int]]) -> torch.Tensor:
        """The kept activations [n, L, D] of the rows, in document order, right-padded to the longest row."""
        width = max(map(len, rows))
        input_ids = torch.tensor([row + [self._pad] * (width - len(row)) for row in rows], device=self.device)
        attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=self.device)
        keep = keep_mask(input_ids, attention_mask, self.tokenizer, self.exclude_special_tokens)
        acts = layer_activations(self.model, self.layers, input_ids, attention_mask)[keep]  # [n, L, D]
        acts = self.nonfinite(acts)  # before the outlier test: a NaN norm would hide from it
        if self.norm_outlier_factor is not None:
            acts = acts[~norm_outliers(acts, self.norm_outlier_factor)]
        return acts
