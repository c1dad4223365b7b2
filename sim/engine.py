"""Discrete-event loop with a virtual clock: a heap of timed callbacks merged with a sorted
array of request arrivals (no heap entry per arrival), and a progress bar on stderr.

No wall-clock reads decide anything here; the bar only reports. Ties run in scheduling order.
"""

from __future__ import annotations

import heapq
import itertools
import sys
import time
from typing import Any, Callable

import numpy as np


class EventLoop:
    def __init__(self, start_s: float = 0.0):
        self.now = start_s
        self._heap: list[tuple[float, int, Callable[..., Any], tuple]] = []
        self._seq = itertools.count()

    def at(self, t: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) at virtual time t (never before now)."""
        heapq.heappush(self._heap, (max(t, self.now), next(self._seq), fn, args))

    def after(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> None:
        self.at(self.now + delay_s, fn, *args)

    def run(self, arrival_s: np.ndarray, on_arrival: Callable[[int], None], until_s: float,
            progress: bool = False) -> None:
        """Process arrivals (index i at arrival_s[i], sorted) and timed events up to until_s.

        An arrival at the same instant as an event runs after it."""
        heap, pop = self._heap, heapq.heappop
        times = arrival_s.tolist()
        n, i = len(times), 0
        bar = _Progress(self.now, until_s) if progress else None
        next_arrival = times[0] if n else float("inf")
        steps = 0
        while True:
            if heap and heap[0][0] <= next_arrival:
                t, _, fn, args = heap[0]
                if t > until_s:
                    break
                pop(heap)
                self.now = t
                fn(*args)
            else:
                if next_arrival > until_s:
                    break
                self.now = next_arrival
                on_arrival(i)
                i += 1
                next_arrival = times[i] if i < n else float("inf")
            steps += 1
            if bar is not None and (steps & 0xFFFF) == 0:
                bar.update(self.now)
        self.now = max(self.now, until_s)
        if bar is not None:
            bar.close(self.now)


class _Progress:
    """A one-line progress bar on stderr, redrawn at most twice a second."""

    def __init__(self, start_s: float, end_s: float):
        self.start_s, self.span_s = start_s, max(end_s - start_s, 1e-9)
        self.wall0 = self.last = time.monotonic()

    def update(self, now_s: float) -> None:
        wall = time.monotonic()
        if wall - self.last >= 0.5:
            self.last = wall
            self._draw(now_s, wall)

    def _draw(self, now_s: float, wall: float) -> None:
        frac = min(max((now_s - self.start_s) / self.span_s, 0.0), 1.0)
        filled = int(frac * 30)
        sys.stderr.write(f"\r  sim [{'#' * filled}{'.' * (30 - filled)}] {frac:6.1%}"
                         f"  t={now_s - self.start_s:9.0f}s  wall={wall - self.wall0:6.1f}s")
        sys.stderr.flush()

    def close(self, now_s: float) -> None:
        self._draw(now_s, time.monotonic())
        sys.stderr.write("\n")
