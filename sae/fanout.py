"""One batch source read by several trainers in lockstep: each sees every batch (or its own slice of it).

The harvester yields [B, L, D] when it captures several layers; a sweep's trainer for layer index i reads
the view `select = lambda x: x[:, i]`. A batch is kept until every view has read it, so the views may be
at most a few batches apart (the trainers' initialisation reads a few batches ahead).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

from sae.errors import ConfigError


class Fanout:
    def __init__(self, source: Iterable[Tensor], n_views: int):
        self.source = source
        self.resumable = callable(getattr(source, "state_dict", None))
        self._iter = None
        self._items: deque[tuple[Tensor, Any]] = deque()  # batches not yet read by every view
        self._first = 0  # index of self._items[0] in the stream
        self._read = [0] * n_views  # next index each view reads
        self._detached: set[int] = set()  # views that stopped reading (a sweep member that stopped)
        self._loaded: Any = None

    def view(self, i: int, select: Callable[[Tensor], Tensor] = lambda x: x, d_in: int | None = None) -> FanoutView:
        return FanoutView(self, i, select, d_in)

    def _get(self, view: int) -> tuple[Tensor, Any]:
        index = self._read[view]
        while index - self._first >= len(self._items):
            if self._iter is None:
                self._iter = iter(self.source)
            batch = next(self._iter)
            self._items.append((batch, self.source.state_dict() if self.resumable else None))
        item = self._items[index - self._first]
        self._read[view] += 1
        self._drop_read()
        return item

    def _drop_read(self) -> None:
        """Forget the batches every attached view has read."""
        reading = [r for i, r in enumerate(self._read) if i not in self._detached]
        while self._items and reading and min(reading) > self._first:
            self._items.popleft()
            self._first += 1

    def detach(self, view: int) -> None:
        """View `view` reads no more: the others no longer keep batches for it."""
        self._detached.add(view)
        self._drop_read()

    def _load(self, state: Any) -> None:
        """Every view loads the same position (the trainers of a sweep checkpoint together): load it once."""
        if self._loaded is not None:
            if state != self._loaded:
                raise ConfigError(
                    "the members of this sweep were saved at different data positions; resume them one by one "
                    "with python -m sae train --resume"
                )
            return
        self.source.load_state_dict(state)  # type: ignore[attr-defined]
        self._loaded, self._iter, self._items, self._first = state, None, deque(), 0
        self._read = [0] * len(self._read)


class FanoutView:
    """What one trainer iterates: batches of the shared source, through `select`, with their positions."""

    def __init__(self, fanout: Fanout, index: int, select: Callable[[Tensor], Tensor], d_in: int | None):
        self.fanout, self.index, self.select = fanout, index, select
        if d_in is not None:
            self.d_in = d_in
        self._position: Any = None

    def __iter__(self):
        while True:
            batch, self._position = self.fanout._get(self.index)
            yield self.select(batch)

    def state_dict(self) -> Any:
        return self._position

    def load_state_dict(self, state: Any) -> None:
        self.fanout._load(state)
