"""Token rows from text: an infinite, seeded, resumable stream of rows (the texts come from harvest.sources).

Examples come from a map-style dataset (a sequence of strings, visited in a seeded permutation per epoch) or
from a stream (datasets streaming=True, visited through a seeded shuffle buffer per epoch). Rows hold one
example each (truncated) or, with packing, consecutive examples cut into full rows. Tokenisation runs in
chunks of CHUNK_EXAMPLES examples, optionally in a background thread (harvest.prefetch).
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Self

import numpy as np

from .config import DataConfig
from .errors import HarvestError
from .prefetch import Prefetcher
from .sources import _TEXT_SEED, TextStream, load_texts

__all__ = ["CHUNK_EXAMPLES", "TokenRows", "load_texts", "token_rows"]

CHUNK_EXAMPLES = 64
"""Examples tokenised per call: one batch call amortises the tokenizer's per-call overhead (and runs in
parallel in Rust), and is the unit the prefetch thread hands over."""

PREFETCH_CHUNKS = 4
"""Chunks the prefetch thread may run ahead of take() (memory: about 4 * 64 rows)."""


@dataclass(frozen=True, eq=False)
class _RowPlan:
    """Everything needed to produce the row stream from a position, and nothing that refers back to the
    TokenRows, so a producer thread never keeps its owner alive."""

    texts: Sequence[str] | TextStream
    tokenizer: Any
    context_size: int
    data_seed: int
    num_examples: int | None
    max_examples: int | None
    prefix: tuple[int, ...]
    packing: bool

    def rows(self, start: dict) -> Iterator[list[tuple[list[int], dict]]]:
        """Chunks of (row, position after it), from position `start` on, forever."""
        return self._packed(start) if self.packing else self._single(start)

    def _order(self, epoch: int) -> np.ndarray:
        first = np.random.default_rng([self.data_seed, _TEXT_SEED, 0]).permutation(len(self.texts))
        order = first[: self.num_examples]
        if epoch > 0:
            order = order[np.random.default_rng([self.data_seed, _TEXT_SEED, epoch]).permutation(len(order))]
        return order

    def _epoch_texts(self, epoch: int, index: int) -> Iterator[str]:
        if isinstance(self.texts, TextStream):
            return itertools.islice(self.texts.epoch(epoch, self.data_seed, self.max_examples), index, None)
        order = self._order(epoch)
        return (self.texts[int(order[i])] or "" for i in range(index, self.num_examples))

    def _examples(self, epoch: int, index: int) -> Iterator[tuple[int, int, str, bool]]:
        """(epoch, index, text, whether it is the epoch's last) from (epoch, index) on, forever."""
        while True:
            texts = self._epoch_texts(epoch, index)
            upcoming = next(texts, None)
            if upcoming is None:
                if index == 0:
                    raise HarvestError("the dataset has no examples: check dataset and split")
                raise HarvestError(
                    f"position epoch={epoch}, index={index} lies past the end of the epoch: the dataset (or "
                    "max_examples) differs from the one the position was taken in"
                )
            while upcoming is not None:
                text, upcoming = upcoming, next(texts, None)
                yield epoch, index, text, upcoming is None
                index += 1
            epoch, index = epoch + 1, 0

    def _tokenize(self, texts: list[str], **limit) -> list[list[int]]:
        # split_special_tokens: a literal "<bos>" in the text stays text, so no BOS ever lands mid-row.
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True, **limit)["input_ids"]

    def _single(self, start: dict) -> Iterator[list[tuple[list[int], dict]]]:
        """One example per row, truncated: the position after a row is the next example."""
        examples = self._examples(start["epoch"], start["index"])
        while True:
            batch = list(itertools.islice(examples, CHUNK_EXAMPLES))
            ids = self._tokenize(
                [text for _, _, text, _ in batch], truncation=True, max_length=self.context_size - len(self.prefix)
            )
            yield [
                ([*self.prefix, *row], {"epoch": epoch + int(last), "index": 0 if last else index + 1})
                for (epoch, index, _, last), row in zip(batch, ids)
            ]

    def _packed(self, start: dict) -> Iterator[list[tuple[list[int], dict]]]:
        """Examples concatenated, each followed by EOS, cut into rows of context_size tokens after the prefix.

        An EOS that would open a row is dropped (the BOS already separates), so a row never starts with EOS.
        The position after a row is the (epoch, index) of the example the next row starts in and the offset
        of its first token there; empty examples are skipped (they would only add an EOS).
        """
        budget, eos = self.context_size - len(self.prefix), self.tokenizer.eos_token_id
        examples = self._examples(start["epoch"], start["index"])
        skip, row = start["offset"], []
        # An epoch read from its first example that yields no token means every example is empty.
        epoch_seen, epoch_tokens, epoch_whole = start["epoch"], 0, start["index"] == 0 and start["offset"] == 0
        while True:
            batch = list(itertools.islice(examples, CHUNK_EXAMPLES))
            out = []
            for (epoch, index, _, last), tokens in zip(
                batch, self._tokenize([t for _, _, t, _ in batch], verbose=False)
            ):
                if epoch != epoch_seen:
                    if epoch_whole and epoch_tokens == 0:
                        raise HarvestError("the dataset yields no tokens to pack: every example is empty")
                    epoch_seen, epoch_tokens, epoch_whole = epoch, 0, True
                epoch_tokens += len(tokens)
                k, skip = skip, 0
                if not tokens:
                    continue
                after_example = {"epoch": epoch + int(last), "index": 0 if last else index + 1, "offset": 0}
                while k < len(tokens) or (row and k == len(tokens)):
                    if k == len(tokens):  # the separator, mid-row
                        row.append(eos)
                        k += 1
                    else:
                        n = min(budget - len(row), len(tokens) - k)
                        row += tokens[k : k + n]
                        k += n
                    if len(row) == budget:
                        # Only the EOS left of this example: the next row would drop it, so it starts after.
                        after = after_example if k >= len(tokens) else {"epoch": epoch, "index": index, "offset": k}
                        out.append(([*self.prefix, *row], after))
                        row = []
            if out:
                yield out


class _Source:
    """The producer of row chunks: the plan's generator, or a Prefetcher running it in a thread."""

    def __init__(self):
        self.iterator: Iterator | None = None

    def close(self) -> None:
        if isinstance(self.iterator, Prefetcher):
            self.iterator.close()
        self.iterator = None


class TokenRows:
    """Infinite stream of token rows [BOS, tokens...] of at most context_size tokens.

    Without packing, one example per row: longer examples are truncated, never split or concatenated, so BOS
    is only ever first. With packing, rows are always full: consecutive examples separated by EOS, split
    across rows where they do not fit, each row starting with BOS.

    texts is a sequence (map-style) or a TextStream. Map-style: epoch 0 visits the examples in a permutation
    seeded by data_seed, and only its first max_examples are used at all; each later epoch e reshuffles those
    in a permutation seeded by (data_seed, e). Stream: epoch e is the stream (its first max_examples) through a
    shuffle buffer seeded by data_seed and e; num_examples is None (its length is unknown).

    The position {"epoch", "index"} (index of the next example within the epoch's order; with packing also
    "offset", the token of that example the next row starts at) resumes the stream exactly. Seeking to the
    position after any row of the latest take() (or before it) reuses the rows already tokenised; any other
    seek restarts the producer there (for a stream: re-reads the epoch and skips `index` examples).

    prefetch: tokenise ahead in a daemon thread (harvest.prefetch), started by the first take() and stopped
    by close() or a seek elsewhere; the rows are the same as without it. The thread uses its own copy of the
    tokenizer (a fast tokenizer's settings are per object, so two threads must not share one).
    """

    def __init__(
        self,
        texts: Sequence[str] | TextStream,
        tokenizer,
        context_size: int,
        data_seed: int = 0,
        max_examples: int | None = None,
        *,
        packing: bool = False,
        prefetch: bool = False,
    ):
        streaming = isinstance(texts, TextStream)
        if not streaming and len(texts) == 0:
            raise HarvestError("the dataset has no examples: check dataset and split")
        if packing and tokenizer.eos_token_id is None:
            raise HarvestError("packing separates examples by EOS, but the tokenizer has no EOS: set packing False")
        self.texts, self.tokenizer, self.context_size, self.data_seed = texts, tokenizer, context_size, data_seed
        self.packing, self.prefetch = packing, prefetch
        self.prefix = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        self.num_examples = None if streaming else min(len(texts), max_examples or len(texts))
        self._plan = _RowPlan(
            texts, tokenizer, context_size, data_seed, self.num_examples, max_examples, tuple(self.prefix), packing
        )
        self._thread_plan: _RowPlan | None = None
        self._start = self._normalise({"epoch": 0, "index": 0})
        # Rows produced from _start on; those before _cursor have been taken. Kept from the latest take() on,
        # so the harvester can hand rows back by seeking to the position after the last one it used.
        self._window: list[tuple[list[int], dict]] = []
        self._cursor = 0
        self._source = _Source()
        weakref.finalize(self, self._source.close)

    def position(self) -> dict:
        return dict(self._window[self._cursor - 1][1] if self._cursor else self._start)

    def seek(self, position: dict) -> None:
        target = self._normalise(position)
        if target == self.position():
            return
        for k, (_, after) in enumerate(self._window):
            if after == target:
                self._cursor = k + 1
                return
        if target == self._start:
            self._cursor = 0
            return
        self._source.close()
        self._window, self._cursor, self._start = [], 0, target

    def take(self, n: int) -> list[tuple[list[int], dict]]:
        """The next n rows, each with the stream position just after it."""
        if n <= 0:
            return []
        if self._cursor:
            self._start = self._window[self._cursor - 1][1]
            del self._window[: self._cursor]
            self._cursor = 0
        while len(self._window) < n:
            self._window += self._next_chunk()
        self._cursor = n
        return [(list(row), dict(after)) for row, after in self._window[:n]]

    def close(self) -> None:
        """Stop the prefetch thread, if one runs; a later take() starts a new one."""
        self._source.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _next_chunk(self) -> list[tuple[list[int], dict]]:
        if self._source.iterator is None:
            start = self._window[-1][1] if self._window else self._start
            if self.prefetch:
                if self._thread_plan is None:
                    self._thread_plan = replace(self._plan, tokenizer=copy.deepcopy(self.tokenizer))
                plan = self._thread_plan
                self._source.iterator = Prefetcher(lambda: plan.rows(start), PREFETCH_CHUNKS, "saekit-tokenize")
            else:
                self._source.iterator = self._plan.rows(start)
        try:
            return next(self._source.iterator)
        except StopIteration:
            self._source.close()
            raise RuntimeError("the row stream ended, but it is infinite") from None
        except BaseException:
            self._source.close()  # the producer is spent: a later take() restarts it
            raise

    def _normalise(self, position: dict) -> dict:
        """The position as this stream writes it: ints, "offset" only with packing."""
        try:
            epoch, index = int(position["epoch"]), int(position["index"])
            offset = int(position.get("offset", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise HarvestError(f"position {position!r} is not a text position {{'epoch', 'index'}}") from e
        if min(epoch, index, offset) < 0:
            raise HarvestError(f"position {position!r} has a negative entry")
        if self.num_examples is not None and index >= self.num_examples:
            raise HarvestError(
                f"position {position!r} lies past the end of an epoch of {self.num_examples} examples: it was "
                "taken on another dataset or max_examples"
            )
        if self.packing:
            return {"epoch": epoch, "index": index, "offset": offset}
        if offset:
            raise HarvestError(f"position {position!r} is inside an example, a packed position: set packing True")
        return {"epoch": epoch, "index": index}


def token_rows(cfg: DataConfig, tokenizer, prefetch: bool = True) -> TokenRows:
    """The token rows cfg describes (map-style or streamed, one example per row or packed), tokenised ahead
    in a background thread unless prefetch is False."""
    return TokenRows(
        load_texts(cfg),
        tokenizer,
        cfg.context_size,
        cfg.data_seed,
        cfg.max_examples,
        packing=cfg.packing,
        prefetch=prefetch,
    )
