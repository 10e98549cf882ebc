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
        self._ahead: Group | None = None  # the next group, read before the wait for the half (see fill)

    def seek(self, cursor: dict) -> None:
        self.reader.seek(cursor["group_start"])
        self._group, self._used, self._skip, self._ahead = None, 0, int(cursor["skip"]), None

    def cursor(self) -> dict:
        """Where the next segment starts."""
        if self._group is not None and self._used < len(self._group.acts):
            return {"group_start": dict(self._group.start), "skip": self._used}
        return {"group_start": dict(self.reader.position()), "skip": self._skip}

    def fill(
        self,
        out: torch.Tensor,
        should_stop: Callable[[], bool] = lambda: False,
        progress: Callable[[int], None] = lambda n: None,
        claim: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Write the next len(out) tokens into out [S, L, D]; False when should_stop() ended it early.

        claim() is called once, just before the first write into out; it may block until out may be
        overwritten, and False stops the fill. When the tokens left of the current group do not fill out,
        the next group's forward runs before claim(), so that only the copies wait for out, not the
        language model (the group is kept until its turn: it is used within this fill)."""
        n, total = 0, len(out)
        left = len(self._group.acts) - self._used if self._group is not None else 0
        if left < total and self._ahead is None:
            if should_stop():
                return False
            self._ahead = self.reader.next_group()
        if not claim():
            return False
        while n < total:
            if self._group is None or self._used == len(self._group.acts):
                if self._ahead is None and should_stop():
                    return False
                group = self._ahead if self._ahead is not None else self.reader.next_group()
                self._group, self._used, self._skip, self._ahead = group, self._skip, 0, None
                if self._used > len(self._group.acts):
                    raise HarvestError(
                        f"the saved data position skips {self._used} tokens of a forward group that has only "
                        f"{len(self._group.acts)}: the data or the tokenizer changed since it was saved"
                    )
            k = min(total - n, len(self._group.acts) - self._used)
            out[n : n + k].copy_(self._group.acts[self._used : self._used + k], non_blocking=True)
            n, self._used = n + k, self._used + k
            progress(k)
        return True
