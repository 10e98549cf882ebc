"""Cutting the stream of forward groups into buffer segments of exactly `segment_tokens` tokens.

A segment starts at a cursor {"group_start": token-stream position of the group holding its first token,
"skip": tokens of that group already delivered to the previous segment}. The tail of a group that does
not fit is kept in memory for the next segment, so no forward is wasted; after a resume it is re-computed
from the cursor (one extra forward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import HarvestError
from .forward import Group, GroupReader


class SegmentFiller:
    def __init__(self, reader: GroupReader):
        self.reader = reader
        self._group: Group | None = None
        self._used = 0
        self._skip = 0  # tokens to skip in the next group read, after a seek to a cursor

    def seek(self, cursor: dict) -> None:
        self.reader.seek(cursor["group_start"])
        self._group, self._used, self._skip = None, 0, int(cursor["skip"])

    def cursor(self) -> dict:
        """Where the next segment starts."""
        if self._group is not None and self._used < len(self._group.acts):
            return {"group_start": dict(self._group.start), "skip": self._used}
        return {"group_start": dict(self.reader.position()), "skip": self._skip}

    def fill(self, out: torch.Tensor, should_stop: Callable[[], bool] = lambda: False,
             progress: Callable[[int], None] = lambda n: None) -> bool:
        """Write the next len(out) tokens into out [S, L, D]; False when should_stop() ended it early."""
        n, total = 0, len(out)
        while n < total:
            if self._group is None or self._used == len(self._group.acts):
                if should_stop():
                    return False
                self._group, self._used, self._skip = self.reader.next_group(), self._skip, 0
                if self._used > len(self._group.acts):
                    raise HarvestError(
                        f"the saved data position skips {self._used} tokens of a forward group that has only "
                        f"{len(self._group.acts)}: the data or the tokenizer changed since it was saved"
                    )
            k = min(total - n, len(self._group.acts) - self._used)
            out[n:n + k].copy_(self._group.acts[self._used:self._used + k], non_blocking=True)
            n, self._used = n + k, self._used + k
            progress(k)
        return True
