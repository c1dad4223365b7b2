"""Time compression of a trace workload for live replays (`forecast import`, `bench live`).

A trace second becomes 1/factor live seconds, anchored so that trace time `anchor_trace_s` is live
time `anchor_live_s`; requests keep their real lengths. `history_windows` gives the per-window
loads the live stack would have seen over a compressed stretch of the trace. Pure: the workload is
passed in, no clock is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.forecaster.core.windows import RequestTiming, trace_windows
from shared.schemas import WindowLoad
from shared.workload import Workload


@dataclass(frozen=True)
class Compression:
    factor: float  # trace seconds per live second (a day in 24 min: 60)
    anchor_trace_s: float  # this trace time ...
    anchor_live_s: float  # ... is this live time (unix seconds)

    def live(self, trace_s: np.ndarray | float) -> np.ndarray | float:
        return self.anchor_live_s + (trace_s - self.anchor_trace_s) / self.factor

    def trace(self, live_s: float) -> float:
        return self.anchor_trace_s + (live_s - self.anchor_live_s) * self.factor


def history_windows(workload: Workload, models: list[int], compression: Compression, first_live_s: float,
                    n_windows: int, window_s: float, timing: RequestTiming) -> list[list[WindowLoad]]:
    """Per chosen model, live windows [first_live_s + j*W, + (j+1)*W), j < n_windows: the average
    and peak outstanding requests of the compressed trace (each request lasting its timing)."""
    start_trace = compression.trace(first_live_s)
    end_trace = compression.trace(first_live_s + n_windows * window_s)
    out = []
    for m in models:
        requests = workload.model_arrivals(m, max(start_trace, 0.0), end_trace)
        arrival = np.asarray(compression.live(requests.time_s)) - first_live_s
        avg, peak = trace_windows(arrival, timing.durations(requests.prompt_tokens, requests.output_tokens),
                                  window_s, n_windows)
        avg = np.maximum(avg, 0.0)  # the integral's rounding can dip a hair below zero
        out.append([WindowLoad(window_start_s=first_live_s + j * window_s, avg=float(a), peak=float(max(p, a)))
                    for j, (a, p) in enumerate(zip(avg, peak))])
    return out
