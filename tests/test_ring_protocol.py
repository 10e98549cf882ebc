"""The ring buffer's stream protocol (harvest/ring.py), checked on the CPU.

harvest.ring.CudaStreams is replaced by a recording fake, and the ring by a tensor that records its reads
and writes with the stream they would run on. A vector-clock model of CUDA streams and events then says
whether every two conflicting accesses of a half (a write and any other access, on different streams) are
ordered by the recorded waits, and whether freeing the ring after close() would wait for every access. The
scenario crosses segments, restarts over the same ring with reads pending, and tears down with a segment
harvested ahead. Then each edge of the protocol is knocked out in turn, and the check must see it.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading

import pytest
import torch

import harvest.harvester as harvester_module
from harvest.ring import RingProducer
from harvest.segments import SegmentFiller
from tests.test_harvest import make, take

CONSUMER = "consumer"


class Trace:
    """Accesses of the ring in issue order, on named streams, with vector clocks: clock[s][t] is how many of
    stream t's operations happen before stream s's next one."""

    def __init__(self):
        self._lock = threading.Condition()
        self._local = threading.local()
        self.clock: dict[str, dict[str, int]] = {CONSUMER: {}}
        self.accesses: list[tuple[str, int, str, int, dict]] = []  # (kind, half, stream, seq, clock)
        self.protected: set[str] = set()  # streams the ring was record_stream'ed on
        self.ready_events = 0

    def new_stream(self, prefix: str) -> str:
        with self._lock:
            name = f"{prefix}{sum(s.startswith(prefix) for s in self.clock)}"
            self.clock[name] = {}
            return name

    def current(self) -> str:
        return getattr(self._local, "stream", CONSUMER)

    @contextlib.contextmanager
    def on(self, stream: str):
        previous = self.current()
        self._local.stream = stream
        try:
            yield
        finally:
            self._local.stream = previous

    def access(self, kind: str, half: int) -> None:
        with self._lock:
            stream = self.current()
            clock = self.clock[stream]
            clock[stream] = clock.get(stream, 0) + 1
            self.accesses.append((kind, half, stream, clock[stream], dict(clock)))

    def record(self, stream: str, origin: str) -> dict:
        with self._lock:
            self.ready_events += origin == "ready"
            self._lock.notify_all()
            return {"clock": dict(self.clock[stream]), "origin": origin}

    def wait(self, stream: str, event: dict) -> None:
        with self._lock:
            clock = self.clock[stream]
            for s, n in event["clock"].items():
                clock[s] = max(clock.get(s, 0), n)

    def wait_for_ready_events(self, n: int, timeout_s: float = 60.0) -> None:
        with self._lock:
            if not self._lock.wait_for(lambda: self.ready_events >= n, timeout_s):
                raise AssertionError(f"the producer published {self.ready_events} segments, not {n}, in {timeout_s} s")

    def violations(self) -> list[str]:
        """Conflicting accesses no wait orders, and accesses a free of the ring on the consumer's stream (the one
        that allocated it) would not wait for, as the caching allocator frees: after the protected streams."""

        def before(a, b) -> bool:
            return b[4].get(a[2], 0) >= a[3]

        found = []
        for i, a in enumerate(self.accesses):
            for b in self.accesses[i + 1 :]:
                if a[1] == b[1] and a[2] != b[2] and "write" in (a[0], b[0]) and not (before(a, b) or before(b, a)):
                    found.append(f"{a[0]} of half {a[1]} on {a[2]} #{a[3]} and {b[0]} on {b[2]} #{b[3]} are unordered")
        free = dict(self.clock[CONSUMER])
        for stream in self.protected:
            for s, n in self.clock[stream].items():
                free[s] = max(free.get(s, 0), n)
        found += [
            f"the ring's free does not wait for the {a[0]} of half {a[1]} on {a[2]} #{a[3]}"
            for a in self.accesses
            if free.get(a[2], 0) < a[3]
        ]
        return found


class FakeStreams:
    """Stands in for harvest.ring.CudaStreams; `drop` names the edges it leaves out (the knock-outs)."""

    def __init__(self, trace: Trace, drop: frozenset[str] = frozenset()):
        self.trace, self.drop = trace, drop
        self.producer = trace.new_stream("producer")
        if "teardown" not in drop:
            trace.protected.add(self.producer)  # ring.record_stream(producer)

    def producing(self):
        return self.trace.on(self.producer)

    def producer_event(self) -> dict:
        return self.trace.record(self.producer, "ready")

    def consumer_event(self) -> dict:
        # Which edge this event starts: RingProducer.__init__ records the restart's, release() the freed ones.
        origin = "start" if sys._getframe(1).f_code.co_name == "__init__" else "freed"
        return self.trace.record(self.trace.current(), origin)

    def producer_waits(self, event: dict) -> None:
        if event["origin"] not in self.drop:
            self.trace.wait(self.producer, event)

    def consumer_waits(self, event: dict) -> None:
        if event["origin"] not in self.drop:
            self.trace.wait(self.trace.current(), event)


def recording_ring(trace: Trace):
    """A torch.Tensor subclass whose copy_ is a write and whose other non-view operations are reads, of the
    halves of the ring [2, S, L, D] its storage holds, on the trace's current stream."""

    class RecordedRing(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if func is torch.Tensor.copy_:
                halves(args[0], "write")
            elif func not in (torch.Tensor.__getitem__, torch.Tensor.__len__) and name != "__get__":
                for arg in args:
                    if isinstance(arg, RecordedRing):
                        halves(arg, "read")
                with torch._C.DisableTorchFunctionSubclass():
                    return func(*args, **kwargs)  # plain tensors: a batch is no view of the ring
            return super().__torch_function__(func, types, args, kwargs)

    def halves(view: torch.Tensor, kind: str) -> None:
        with torch._C.DisableTorchFunctionSubclass():
            half_numel = view.untyped_storage().nbytes() // view.element_size() // 2
            first = view.storage_offset()
            last = first + sum((n - 1) * s for n, s in zip(view.shape, view.stride()))
        for half in range(first // half_numel, last // half_numel + 1):
            trace.access(kind, half)

    return RecordedRing


@pytest.fixture
def recorded(monkeypatch):
    """Install the fake streams and the recording ring in the harvester; returns (trace, knock_out), where
    knock_out(edge) leaves one edge out of the protocol ("one stream": a stream per producer, not per ring)."""
    trace = Trace()
    drop: set[str] = set()
    ring_type = recording_ring(trace)
    allocate = harvester_module.Harvester._allocate

    def recording_allocate(self):
        ring = allocate(self)
        if not isinstance(ring, ring_type):
            self._ring = ring = ring.as_subclass(ring_type)
        return ring

    monkeypatch.setattr(harvester_module.Harvester, "_allocate", recording_allocate)
    monkeypatch.setattr(harvester_module, "stream_sync", lambda ring, threaded: FakeStreams(trace, frozenset(drop)))

    def knock_out(edge: str) -> None:
        if edge == "one stream":

            def producer_with_its_own_stream(ring, sync, *args, **kwargs):
                return RingProducer(ring, FakeStreams(trace, frozenset(drop)), *args, **kwargs)

            monkeypatch.setattr(harvester_module, "RingProducer", producer_with_its_own_stream)
        else:
            drop.add(edge)

    return trace, knock_out


def run_scenario(tiny_model, text_file, trace: Trace) -> list[torch.Tensor]:
    """2 batches per segment. The first iterator reads segments 0 and 1 and one batch of segment 2, while the
    producer harvests segment 3 ahead; a second iterator continues over the same ring (refilling segment 2's
    half while the first one's read of it may still be queued) through segment 4, with segment 5 harvested
    ahead when it closes."""
    h = make(tiny_model, text_file, overlap=True)
    first = iter(h)
    batches = take(first, 5)
    trace.wait_for_ready_events(4)  # segments 0 to 3
    second = iter(h)
    batches += take(second, 4)
    trace.wait_for_ready_events(8)  # and segments 2 to 5 again
    h.close()
    return batches


def test_the_protocol_orders_every_conflicting_access(tiny_model, text_file, recorded):
    trace, _ = recorded
    batches = run_scenario(tiny_model, text_file, trace)
    reads = sum(kind == "read" for kind, *_ in trace.accesses)
    writes = {stream for kind, _, stream, *_ in trace.accesses if kind == "write"}
    assert reads == 9 and writes == {"producer0"}, "the trace should hold every batch's read, written on one stream"
    assert trace.violations() == []
    inline = take(iter(make(tiny_model, text_file, overlap=False)), 9)  # the fake streams change nothing
    assert all(torch.equal(a, b) for a, b in zip(batches, inline))


@pytest.mark.parametrize(
    "edge,symptom",
    [
        (
            "ready",
            r"write of half 0 on producer0 #1 and read on consumer #1 ",
        ),  # a fill's writes vs its segment's reads
        (
            "freed",
            r"read of half 0 on consumer #2 and write on producer0 #",
        ),  # segment 0's last read vs segment 2's fill
        (
            "start",
            r"read of half 0 on consumer #5 and write on producer0 #",
        ),  # the first iterator's last read vs refill
        ("one stream", r"write of half 1 on producer1 #\d+ and write on producer2 #"),  # segment 3, harvested twice
        ("teardown", r"the ring's free does not wait for the write of half 1 on producer0"),  # segment 5, never read
    ],
)
def test_each_edge_is_needed(tiny_model, text_file, recorded, edge, symptom):
    trace, knock_out = recorded
    knock_out(edge)
    run_scenario(tiny_model, text_file, trace)
    found = trace.violations()
    assert any(re.search(symptom, v) for v in found), found


@pytest.mark.parametrize("overlap", [False, True])
def test_a_stopped_iterator_reads_nothing_more_of_its_segment(tiny_model, text_file, overlap):
    h = make(tiny_model, text_file, overlap=overlap)
    old = iter(h)
    take(old, 1)  # segment 0 has a batch left
    h.close()
    with pytest.raises(RuntimeError, match="iterator was stopped"):
        next(old)
    assert h.state_dict()["batch"] == 1
    h.close()


class FakeReader:
    """Groups of `sizes[i]` one-token-wide activations numbered in stream order; records reads on `log`."""

    def __init__(self, sizes: list[int], log: list[str]):
        self.sizes, self.log, self.index, self.token = sizes, log, 0, 0

    def seek(self, position: dict) -> None:
        self.index, self.token = position["index"], sum(self.sizes[: position["index"]])

    def position(self) -> dict:
        return {"index": self.index}

    def next_group(self):
        from harvest.forward import Group

        self.log.append("forward")
        n = self.sizes[self.index]
        group = Group({"index": self.index}, torch.arange(self.token, self.token + n, dtype=torch.float32)[:, None])
        self.index, self.token = self.index + 1, self.token + n
        return group


def test_the_next_forward_runs_before_the_wait_for_the_half():
    log: list[str] = []
    filler = SegmentFiller(FakeReader([5, 7, 3, 6, 20], log))
    filler.seek({"group_start": {"index": 0}, "skip": 0})
    out = torch.empty(8, 1)
    for k in range(5):
        log.append("|")
        assert filler.fill(out, claim=lambda: log.append("claim") or True)
        assert out[:, 0].tolist() == list(range(8 * k, 8 * k + 8))
    # Each fill whose first group's tokens left (0, 4, 5, 17, 9) do not fill it reads its next group before the
    # claim; later groups of the same fill are read after it.
    assert "".join(log).split("|")[1:] == [
        "forwardclaimforward",
        "forwardclaimforward",
        "forwardclaim",
        "claim",
        "claim",
    ]
    assert not filler.fill(out, should_stop=lambda: True)  # 1 token left: the next forward is not started
    assert log[-1] == "claim"
