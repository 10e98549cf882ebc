"""The device ring buffer: two preallocated halves on the training device, one drained while the other fills.

The producer fills segment k into half k % 2, segment k + 1 into the other half, then waits until the
consumer has drained segment k before writing segment k + 2 over it. With `threaded`, the producer runs in
a daemon thread (on CUDA, on its own stream, synchronised with the consumer's stream by events), so the
language model's forward overlaps the SAE step; without it, the consumer fills each segment itself when it
needs it. Both give the same segments, bit for bit: a segment's contents depend only on its cursor.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch

from .segments import SegmentFiller


class Segment(NamedTuple):
    index: int
    half: int
    end: dict  # cursor of the next segment
    ready: torch.cuda.Event | None  # recorded on the producer's stream after the last write (CUDA only)


class _Stopped(Exception):
    pass


class RingProducer:
    def __init__(self, ring: torch.Tensor, filler: SegmentFiller, first_segment: int, cursor: dict,
                 threaded: bool, progress=None):
        """ring: [2, S, L, D]. progress: a callable(n_tokens) for the first segment's fill (the start-up wait)."""
        self.ring, self.filler, self.threaded, self.progress = ring, filler, threaded, progress
        self.cuda = ring.device.type == "cuda"
        self._first = self._next = first_segment
        self._free = [True, True]
        self._freed = [None, None]  # consumer-stream events after a half's last read (CUDA)
        self._ready: dict[int, Segment] = {}
        self._error: BaseException | None = None
        self._stop = False
        self._cond = threading.Condition()
        self.filler.seek(cursor)
        self._thread = None
        if threaded:
            self._stream = torch.cuda.Stream(ring.device) if self.cuda else None
            self._thread = threading.Thread(target=self._run, name="saekit-harvester", daemon=True)
            self._thread.start()

    # -- producer side ----------------------------------------------------------------------------

    def _fill_one(self) -> Segment:
        index = self._next
        half = index % 2
        progress = self.progress if index == self._first and self.progress else (lambda n: None)
        if self.cuda and self.threaded:
            with torch.cuda.stream(self._stream):
                if self._freed[half] is not None:
                    self._stream.wait_event(self._freed[half])
                done = self.filler.fill(self.ring[half], self._stopping, progress)
                ready = torch.cuda.Event()
                ready.record(self._stream)
        else:
            done = self.filler.fill(self.ring[half], self._stopping, progress)
            ready = None
        if not done:
            raise _Stopped
        self._next += 1
        return Segment(index, half, self.filler.cursor(), ready)

    def _stopping(self) -> bool:
        return self._stop

    def _run(self) -> None:
        try:
            while True:
                half = self._next % 2
                with self._cond:
                    while not (self._free[half] or self._stop):
                        self._cond.wait()
                    if self._stop:
                        return
                    self._free[half] = False
                segment = self._fill_one()
                with self._cond:
                    self._ready[segment.index] = segment
                    self._cond.notify_all()
        except _Stopped:
            return
        except BaseException as err:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            with self._cond:
                self._error = err
                self._cond.notify_all()

    # -- consumer side ----------------------------------------------------------------------------

    def wait(self, index: int) -> Segment:
        """Segment `index`, once filled; the consumer's stream waits for its writes (CUDA)."""
        if not self.threaded:
            assert index == self._next, "segments are consumed in order"
            try:
                segment = self._fill_one() if not self._stop else self._stopped()
            except _Stopped:
                self._stopped()
        else:
            with self._cond:
                while index not in self._ready and self._error is None and not self._stop:
                    self._cond.wait()
                if self._error is not None:
                    raise self._error
                if self._stop:
                    self._stopped()
                segment = self._ready.pop(index)
        if segment.ready is not None:
            torch.cuda.current_stream(self.ring.device).wait_event(segment.ready)
        return segment

    @staticmethod
    def _stopped():
        raise RuntimeError(
            "this harvester iterator was stopped (by close(), load_state_dict() or a newer iter() of the same "
            "Harvester); iterate the Harvester again to continue from its position"
        )

    def release(self, segment: Segment) -> None:
        """The consumer has issued its last read of the segment's half: the producer may overwrite it."""
        if self.cuda and self.threaded:
            freed = torch.cuda.Event()
            freed.record(torch.cuda.current_stream(self.ring.device))
            self._freed[segment.half] = freed
        with self._cond:
            self._free[segment.half] = True
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
