"""The device ring buffer: two preallocated halves on the training device, one drained while the other fills.

The producer fills segment k into half k % 2, segment k + 1 into the other half, then waits until the
consumer has drained segment k before writing segment k + 2 over it. With `threaded`, the producer runs in
a daemon thread (on CUDA, on its own stream, synchronised with the consumer's stream by events), so the
language model's forward overlaps the SAE step; without it, the consumer fills each segment itself when it
needs it. Both give the same segments, bit for bit: a segment's contents depend only on its cursor.

The stream protocol on CUDA (every edge is checked by tests/test_ring_protocol.py; S the producer's stream,
C the consumer's, which is the stream current on the consumer's thread):
- a fill's writes happen before the consumer's reads of its half: the fill records `ready` on S, and C waits
  on it before the first read (`wait`);
- the consumer's reads of a half happen before the next fill's writes into it: after its last read the
  consumer records `freed` on C (`release`), and S waits on it just before the first write into that half,
  not before the fill's forward, which may run ahead while the consumer still reads;
- a restart (a new producer over the same ring) follows the previous one: every producer of a ring writes on
  the ring's one stream S, after the previous producer's thread has been joined, so its writes follow the
  old ones in stream order; its first write into either half waits on an event recorded on C when it
  starts, after the reads of the previous iterator;
- teardown: the ring is marked as used on S (`record_stream`), so when it is freed the caching allocator
  does not hand its memory out again before S's writes into it have run. Everything else the producer
  allocates (a forward's activations, a group's tail) is allocated, used and freed on S alone.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import torch

from .segments import SegmentFiller


class Segment(NamedTuple):
    index: int
    half: int
    end: dict  # cursor of the next segment
    ready: Any  # an event of the ring's StreamSync, recorded on the producer's stream after the last write; or None


class CudaStreams:
    """The stream and event operations of a threaded producer on a CUDA ring, in one place: the protocol's
    test replaces this class with a recording fake. One per ring; every producer over the ring shares it."""

    def __init__(self, ring: torch.Tensor):
        """ring: [2, S, L, D] on a CUDA device, allocated on the consumer's stream."""
        self.device = ring.device
        self.producer = torch.cuda.Stream(self.device)
        ring.record_stream(self.producer)  # teardown: its memory is not reused before the producer's writes ran

    def producing(self) -> AbstractContextManager:
        """Make the producer's stream current on this thread (for the fill's forward, allocations and copies)."""
        return torch.cuda.stream(self.producer)

    def producer_event(self) -> torch.cuda.Event:
        return self.producer.record_event()

    def consumer_event(self) -> torch.cuda.Event:
        return torch.cuda.current_stream(self.device).record_event()

    def producer_waits(self, event: torch.cuda.Event) -> None:
        self.producer.wait_event(event)

    def consumer_waits(self, event: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)


def stream_sync(ring: torch.Tensor, threaded: bool) -> CudaStreams | None:
    """The ring's stream operations when a producer thread fills a CUDA ring; None otherwise (one thread, or
    the CPU: there every operation runs in the order it is issued)."""
    return CudaStreams(ring) if threaded and ring.device.type == "cuda" else None


class _Stopped(Exception):
    pass


class RingProducer:
    def __init__(
        self,
        ring: torch.Tensor,
        sync: CudaStreams | None,
        filler: SegmentFiller,
        first_segment: int,
        cursor: dict,
        threaded: bool,
        progress=None,
    ):
        """ring: [2, S, L, D]. sync: the ring's stream_sync(ring, threaded), made once per ring.
        progress: a callable(n_tokens) for the first segment's fill (the start-up wait)."""
        self.ring, self.sync, self.filler, self.threaded, self.progress = ring, sync, filler, threaded, progress
        self._first = self._next = first_segment
        self._free = [True, True]
        # Consumer-stream events after a half's last read; at start, after the previous iterator's reads.
        start = sync.consumer_event() if sync is not None else None
        self._freed = [start, start]
        self._ready: dict[int, Segment] = {}
        self._error: BaseException | None = None
        self._stop = False
        self._cond = threading.Condition()
        self.filler.seek(cursor)
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="saekit-harvester", daemon=True)
            self._thread.start()

    # -- producer side ----------------------------------------------------------------------------

    def _fill_one(self) -> Segment:
        index = self._next
        half = index % 2
        progress = self.progress if index == self._first and self.progress else (lambda n: None)

        def claim() -> bool:  # called by the filler just before its first write into the half
            return self._claim(half)

        if self.sync is not None:
            with self.sync.producing():
                done = self.filler.fill(self.ring[half], self._stopping, progress, claim)
                ready = self.sync.producer_event() if done else None
        else:
            done = self.filler.fill(self.ring[half], self._stopping, progress, claim)
            ready = None
        if not done:
            raise _Stopped
        self._next += 1
        return Segment(index, half, self.filler.cursor(), ready)

    def _claim(self, half: int) -> bool:
        """Wait until `half` may be overwritten; False when stopping. Threaded: until the consumer has issued
        its last read of it (inline, the consumer only asks for a fill once it is done with the half); on
        CUDA the producer's stream then waits for those reads to run."""
        if not self.threaded:
            return True
        with self._cond:
            while not (self._free[half] or self._stop):
                self._cond.wait()
            if self._stop:
                return False
            self._free[half] = False
        if self.sync is not None:
            self.sync.producer_waits(self._freed[half])
        return True

    def _stopping(self) -> bool:
        return self._stop

    def _run(self) -> None:
        try:
            while True:
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
            self.sync.consumer_waits(segment.ready)
        return segment

    def check(self) -> None:
        """Raise if this producer was stopped: its iterator must not read the ring any more, which a newer
        producer may be refilling."""
        if self._stop:
            self._stopped()

    @staticmethod
    def _stopped():
        raise RuntimeError(
            "this harvester iterator was stopped (by close(), load_state_dict() or a newer iter() of the same "
            "Harvester); iterate the Harvester again to continue from its position"
        )

    def release(self, segment: Segment) -> None:
        """The consumer has issued its last read of the segment's half: the producer may overwrite it."""
        if self.sync is not None:
            self._freed[segment.half] = self.sync.consumer_event()
        with self._cond:
            self._free[segment.half] = True
            self._cond.notify_all()

    def stop(self) -> None:
        """Stop the producer and join its thread: afterwards it issues no more work on any stream."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
