"""Periods shorter than the season in a model's recent windows (a batch job every N minutes).

`detect_periods` finds, per model, the shortest lag whose autocorrelation over the recent windows
is a clear peak (high, and preceded by a dip: a smooth trend has no dip and so no period), seen
at least twice; `periodic_mean` predicts window t from the same phase of the last periods. Both
vectorised over models, NaN = unknown window. Pure, no I/O.
"""

from __future__ import annotations

import numpy as np

MIN_PERIOD = 2  # windows; a period of one window is just a steady load
MIN_CORRELATION = 0.5  # a period's autocorrelation must reach this
MIN_DIP = 0.3  # and exceed the lowest autocorrelation at a shorter lag by this much
SHORTEST_OF_BEST = 0.85  # a multiple of the period correlates as well: take the shortest lag this close to the best
PERIODS_AVERAGED = 3  # periodic_mean: the same phase this many periods back (the known ones)


def autocorrelation(recent: np.ndarray, max_lag: int) -> tuple[np.ndarray, np.ndarray]:
    """(acf, pairs), each (n_models, max_lag + 1): the correlation of the series with itself `lag`
    windows later over the pairs where both windows are known, and how many such pairs there are."""
    known = ~np.isnan(recent)
    count = np.maximum(known.sum(axis=1, keepdims=True), 1)
    centred = np.where(known, recent - np.nansum(recent, axis=1, keepdims=True) / count, 0.0)
    size = 1 << int(np.ceil(np.log2(2 * recent.shape[1])))
    spectrum = np.fft.rfft(centred, size)
    mask_spectrum = np.fft.rfft(known.astype(float), size)
    products = np.fft.irfft(spectrum * np.conj(spectrum), size)[:, :max_lag + 1]
    pairs = np.rint(np.fft.irfft(mask_spectrum * np.conj(mask_spectrum), size)[:, :max_lag + 1])
    variance = (centred ** 2).sum(axis=1, keepdims=True) / count
    acf = np.where((pairs > 0) & (variance > 1e-12), products / np.maximum(pairs, 1) / np.maximum(variance, 1e-12), 0.0)
    return acf, pairs


def detect_periods(recent: np.ndarray, max_period: int) -> np.ndarray:
    """Per model (rows of `recent`, oldest window first) the detected period in windows, 0 if none."""
    n, length = recent.shape
    max_lag = min(max_period, length // 2)
    if max_lag < MIN_PERIOD:
        return np.zeros(n, dtype=np.int64)
    acf, pairs = autocorrelation(recent, max_lag + 1)
    lags = np.arange(max_lag + 2)
    lowest_before = np.minimum.accumulate(acf, axis=1)  # lowest correlation at lags up to each lag
    peak = np.zeros_like(acf, dtype=bool)
    peak[:, 1:-1] = (acf[:, 1:-1] >= acf[:, :-2]) & (acf[:, 1:-1] >= acf[:, 2:])
    candidate = (peak & (lags >= MIN_PERIOD) & (lags <= max_lag) & (pairs >= lags)  # seen twice at least
                 & (acf >= MIN_CORRELATION) & (acf - lowest_before >= MIN_DIP))
    best = np.where(candidate, acf, -np.inf).max(axis=1)
    good = candidate & (acf >= SHORTEST_OF_BEST * best[:, None])
    return np.where(good.any(axis=1), np.argmax(good, axis=1), 0)


def periodic_mean(lagged: np.ndarray, periods: np.ndarray) -> np.ndarray:
    """Mean of the known values at t - k*period, k = 1..PERIODS_AVERAGED; NaN where the model has
    no period or none of them is known. `lagged[m, j]` = L[t - j] for j = 0..width-1."""
    steps = periods[:, None] * np.arange(1, PERIODS_AVERAGED + 1)[None, :]
    inside = (periods[:, None] > 0) & (steps < lagged.shape[1])
    values = np.take_along_axis(lagged, np.where(inside, steps, 0), axis=1)
    values = np.where(inside, values, np.nan)
    known = ~np.isnan(values)
    total = np.where(known, values, 0.0).sum(axis=1)
    return np.where(known.any(axis=1), total / np.maximum(known.sum(axis=1), 1), np.nan)
