"""Window maths: per-window time-weighted average and peak of outstanding requests.

From a request trace (each request outstanding from arrival for its duration; backtests) and from
live load samples (the service). Pure: times come in as arguments, nothing here reads a clock.
Live windows: time no sample covers counts as zero outstanding (the gateway reports busy models);
overlapping samples add up (several gateways), their peaks combine by max (floored at the average).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from shared.schemas import LoadSample, Message


@dataclass(frozen=True)
class RequestTiming:
    """How long a request stays outstanding: prefill over all prompt tokens, then decode per token."""

    prefill_s_per_token: float = 0.0002
    decode_s_per_token: float = 0.02

    def durations(self, prompt_tokens: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
        return prompt_tokens * self.prefill_s_per_token + output_tokens * self.decode_s_per_token


def window_index(at_s: float, window_s: float) -> int:
    """Windows are aligned to multiples of window_s since time 0 (unix epoch or trace start)."""
    return math.floor(at_s / window_s + 1e-9)


DAY_S = 86400.0


def season_length(window_s: float, season_s: float = DAY_S) -> int:
    """Windows per season (a day unless time is compressed: the seasonal period)."""
    return max(1, round(season_s / window_s))


def trace_windows(arrival_s: np.ndarray, duration_s: np.ndarray, window_s: float,
                  n_windows: int) -> tuple[np.ndarray, np.ndarray]:
    """(avg, peak) of outstanding requests in windows [j*W, (j+1)*W), j < n_windows, exactly.

    A request is outstanding on [arrival, arrival + duration). arrival_s must be sorted.
    """
    edges = np.arange(n_windows + 1) * window_s
    depart = np.sort(arrival_s + duration_s)
    arrive_cum = np.concatenate([[0.0], np.cumsum(arrival_s)])
    depart_cum = np.concatenate([[0.0], np.cumsum(depart)])
    n_arrived = np.searchsorted(arrival_s, edges, side="right")
    n_departed = np.searchsorted(depart, edges, side="right")
    # integral of the outstanding count from 0 to T = sum over arrivals <= T of (T - a) - same for departures
    integral = (n_arrived * edges - arrive_cum[n_arrived]) - (n_departed * edges - depart_cum[n_departed])
    avg = np.diff(integral) / window_s
    # count at each window start, and just after each arrival
    at_edge = (n_arrived - n_departed)[:-1].astype(float)
    after_arrival = np.arange(1, len(arrival_s) + 1) - np.searchsorted(depart, arrival_s, side="right")
    peak = at_edge.copy()
    in_range = arrival_s < edges[-1]
    if in_range.any():
        owner = np.floor(arrival_s[in_range] / window_s).astype(np.int64)
        np.maximum.at(peak, owner, after_arrival[in_range])
    return avg, peak


# ---------------------------------------------------------------- live windows from load samples


class WindowStats(Message):
    """One model's load in one completed window (a value of the Redis window history)."""

    window_start_s: float  # start of the window, unix seconds
    window_s: float = Field(gt=0)  # window length
    avg: float = Field(ge=0)  # time-weighted mean outstanding requests
    peak: float = Field(ge=0)  # peak outstanding requests
    covered_s: float = Field(default=0.0, ge=0)  # seconds of the window covered by samples


class PartialLoad(Message):
    """One model's load accumulated so far in a window that is still open."""

    window_start_s: float
    load_s: float = 0.0  # integral of outstanding requests over the covered time (request-seconds)
    peak: float = 0.0
    covered_s: float = 0.0


class PartialWindows(Message):
    """One model's open windows (normally one, two around a boundary)."""

    windows: list[PartialLoad] = []


def sample_problem(sample: LoadSample, now_s: float, window_s: float) -> str | None:
    """Why a schema-valid sample is still unusable, or None."""
    if not sample.model.strip():
        return "empty model name"
    values = (sample.at_s, sample.interval_s, sample.avg_outstanding, sample.peak_outstanding)
    if not all(math.isfinite(v) for v in values):
        return "non-finite number"
    if sample.peak_outstanding + 1e-9 < sample.avg_outstanding:
        return "peak_outstanding below avg_outstanding"
    if sample.interval_s > window_s:
        return "interval_s longer than the window"
    if sample.at_s > now_s + window_s:
        return "sample from the future"
    return None


def import_problem(window_s: float, expected_window_s: float, window_starts_s: list[float]) -> str | None:
    """Why imported windows cannot join the history (another window length, misaligned), or None."""
    if abs(window_s - expected_window_s) > 1e-9:
        return f"window_s {window_s:g} is not the forecaster's window ({expected_window_s:g} s)"
    misaligned = [s for s in window_starts_s if abs(s / window_s - round(s / window_s)) > 1e-6]
    if misaligned:
        return f"window_start_s {misaligned[0]!r} is not a multiple of window_s {window_s:g}"
    return None


def add_sample(partial: PartialWindows, sample: LoadSample, window_s: float,
               first_open_start_s: float) -> tuple[PartialWindows, float]:
    """Spread a sample over the windows it overlaps; returns (new partial, seconds dropped as late).

    Windows starting before `first_open_start_s` are closed already: their share is dropped.
    """
    start_s, end_s = sample.at_s - sample.interval_s, sample.at_s
    by_start = {w.window_start_s: w for w in partial.windows}
    late_s = 0.0
    index = window_index(start_s, window_s)
    while index * window_s < end_s:
        w_start = index * window_s
        overlap = min(end_s, w_start + window_s) - max(start_s, w_start)
        index += 1
        if overlap <= 0:
            continue
        if w_start < first_open_start_s - 1e-9:
            late_s += overlap
            continue
        old = by_start.get(w_start, PartialLoad(window_start_s=w_start))
        by_start[w_start] = PartialLoad(window_start_s=w_start,
                                        load_s=old.load_s + sample.avg_outstanding * overlap,
                                        peak=max(old.peak, sample.peak_outstanding),
                                        covered_s=old.covered_s + overlap)
    return PartialWindows(windows=sorted(by_start.values(), key=lambda w: w.window_start_s)), late_s


def close_window(partial: PartialWindows, window_start_s: float, window_s: float) -> tuple[WindowStats, PartialWindows]:
    """Finish one window (zero load where nothing was reported) and drop it from the partial."""
    load = next((w for w in partial.windows if abs(w.window_start_s - window_start_s) < 1e-9),
                PartialLoad(window_start_s=window_start_s))
    avg = load.load_s / window_s
    stats = WindowStats(window_start_s=window_start_s, window_s=window_s, avg=avg,
                        peak=max(load.peak, avg), covered_s=min(load.covered_s, window_s))
    rest = [w for w in partial.windows if w.window_start_s > window_start_s + 1e-9]
    return stats, PartialWindows(windows=rest)
