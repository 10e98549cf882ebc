"""Run an iterator ahead of its consumer in a daemon thread, through a bounded queue.

Used for tokenisation: fast tokenizers batch-encode in Rust without holding the GIL, so a producer thread
tokenising the next chunks overlaps with the language model's forward in the caller's thread. The items come
out in the iterator's own order, so a consumer sees exactly what iterating it directly would give.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_POLL_S = 0.05
"""How often a producer blocked on a full queue checks whether it was told to stop."""


class _Done:
    """Queue marker: the iterator is exhausted."""


class _Failed:
    """Queue marker carrying the exception the iterator raised."""

    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher(Generic[T]):
    """Iterate make_iterator() in a daemon thread, up to `depth` items ahead of next().

    The thread starts on the first next(), not at construction. An exception raised by the iterator is raised
    again by the next() that reaches it. close() stops and joins the thread; a closed Prefetcher can't be
    reused (make a new one, e.g. from a new start position).
    """

    def __init__(self, make_iterator: Callable[[], Iterator[T]], depth: int = 4, name: str = "prefetch"):
        if depth < 1:
            raise ValueError(f"depth={depth} must be at least 1")
        self._make_iterator, self._name = make_iterator, name
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = False

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._stop.is_set() or self._finished:
            raise StopIteration
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name=self._name, daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, _Done):
            self._finished = True
            raise StopIteration
        if isinstance(item, _Failed):
            self._finished = True
            raise item.error
        return item

    def close(self) -> None:
        """Stop the thread (it finishes the item it is computing, then exits) and wait for it."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None or thread is threading.current_thread():
            return  # a finaliser run by the garbage collector on the worker itself: the stop flag suffices
        while thread.is_alive():
            try:  # make room, so a producer blocked on put() sees the stop at its next poll
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            thread.join(_POLL_S)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _put(self, item) -> bool:
        """Put item unless told to stop first; returns whether it went in."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            iterator = self._make_iterator()
            for item in iterator:
                if not self._put(item):
                    return
            self._put(_Done())
        except BaseException as error:  # noqa: BLE001 (handed over: __next__ raises it in the consumer's thread)
            self._put(_Failed(error))
