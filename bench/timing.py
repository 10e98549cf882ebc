"""One timing method for every case: warm-up, then many repetitions; median and interquartile range.

On CUDA each repetition is bracketed by CUDA events (device time, no host clock), and the L2 cache is
flushed before each one by zeroing a 256 MiB buffer outside the events, so that small cases are not timed
out of the cache. On the CPU, and for work that runs on other threads or streams (the harvester), each
repetition is timed with `time.perf_counter` around a device-wide synchronisation. The first call (kernel
compilation, torch.compile, allocator growth, optimizer state creation) is timed on its own and reported as
`first_call_s`; more warm-up calls follow until `warmup_s` has passed (at least `min_warmup`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch


class Timing(NamedTuple):
    median_s: float
    iqr_s: float  # interquartile range of the repetitions
    min_s: float
    repeats: int
    warmup: int  # warm-up calls after the first one
    first_call_s: float  # includes compilation / autotuning / allocation


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Times callables on one device. `repeat_s`: the time to spend on timed repetitions per case."""

    def __init__(
        self,
        device: torch.device,
        repeat_s: float = 1.0,
        warmup_s: float = 0.2,
        min_repeats: int = 3,
        max_repeats: int = 200,
    ):
        self.device, self.repeat_s, self.warmup_s = device, repeat_s, warmup_s
        self.min_repeats, self.max_repeats = min_repeats, max_repeats
        self._flush = None
        if device.type == "cuda":
            self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def _once(self, fn: Callable[[], object]) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        fn()
        sync(self.device)
        return time.perf_counter() - t0

    def time(self, fn: Callable[[], object], min_warmup: int = 1, wall_clock: bool = False) -> Timing:
        """wall_clock: time each call on the host around a device-wide synchronisation, also on CUDA (for work
        issued from other threads or streams, which events on the current stream would not bracket)."""
        first = self._once(fn)
        warm, spent, last = 0, 0.0, first
        while warm < min_warmup or (spent < self.warmup_s and warm < 20):
            last = self._once(fn)
            spent += last
            warm += 1
        repeats = int(min(self.max_repeats, max(self.min_repeats, self.repeat_s / max(last, 1e-9))))
        if self.device.type == "cuda" and not wall_clock:
            times = self._device_times(fn, repeats)
        else:
            times = [self._once(fn) for _ in range(repeats)]
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        return Timing(statistics.median(times), q[2] - q[0], min(times), repeats, warm, first)

    def _device_times(self, fn: Callable[[], object], repeats: int) -> list[float]:
        pairs = []
        for _ in range(repeats):
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) / 1e3 for s, e in pairs]
