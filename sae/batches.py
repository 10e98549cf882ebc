"""The trainer's view of its data: any iterator of [B, D] batches, with its position tracked per batch.

A source may offer `state_dict()` / `load_state_dict(state)` (the harvester does): then every batch comes
with the position *after* it, so a checkpoint taken after training on a batch resumes at the next one,
even when the trainer looked ahead (the first batches are read early to initialise the SAE).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from torch import Tensor


class BatchStream:
    def __init__(self, source: Iterable[Tensor]):
        self.source = source
        self.resumable = callable(getattr(source, "state_dict", None)) and callable(
            getattr(source, "load_state_dict", None)
        )
        self._iter = None
        self._ahead: deque[tuple[Tensor, Any]] = deque()

    def load_state_dict(self, state: Any) -> None:
        if not self.resumable:
            raise TypeError("this batch source has no load_state_dict(); it cannot continue from a saved position")
        self.source.load_state_dict(state)  # type: ignore[attr-defined]
        self._iter, self._ahead = None, deque()

    def _pull(self) -> tuple[Tensor, Any]:
        if self._iter is None:
            self._iter = iter(self.source)
        try:
            batch = next(self._iter)
        except StopIteration:
            raise RuntimeError(
                "the activation source ran out of batches before the run's --steps were done; "
                "give it more data or lower --steps"
            ) from None
        position = self.source.state_dict() if self.resumable else None  # type: ignore[attr-defined]
        return batch, position

    def peek(self, n: int) -> list[Tensor]:
        """The next n batches, which `next()` will still return afterwards."""
        while len(self._ahead) < n:
            self._ahead.append(self._pull())
        return [b for b, _ in list(self._ahead)[:n]]

    def next(self) -> tuple[Tensor, Any]:
        """(batch [B, D], position after it: None for a source without state_dict)."""
        return self._ahead.popleft() if self._ahead else self._pull()
