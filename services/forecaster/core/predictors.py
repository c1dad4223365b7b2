"""The paper's Corrective Seasonal Predictor (DESIGN.md §3.1) and the seasonal-naive baseline.

Vectorised over all models: each function reads a LoadHistory series and returns one prediction
per model for window t (NaN history = unknown). A predictor object adds `learn` (fed each completed
window before it is recorded) so stateful predictors share the interface. Pure, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.forecaster.core.history import LoadHistory


@dataclass(frozen=True)
class Predictions:
    avg: np.ndarray  # per model row
    peak: np.ndarray
    methods: list[str]  # which predictor produced each model's forecast


def lag_grid(history: LoadHistory, series: np.ndarray, t: int, season: int, days: int,
             errors: int) -> np.ndarray:
    """G[m, w, d] = L[t - w - d*season] for w = 0..errors, d = 0..days (G[:, 0, 0] is the target)."""
    offsets = np.arange(errors + 1)[:, None] + season * np.arange(days + 1)[None, :]
    return history.lags(series, t, offsets)


def nan_mean(values: np.ndarray, axis: int) -> np.ndarray:
    """Mean over the known entries; 0 where none is known."""
    known = ~np.isnan(values)
    count = known.sum(axis=axis)
    return np.where(known, values, 0.0).sum(axis=axis) / np.maximum(count, 1)


def weighted_correction(errors: np.ndarray, usable: int) -> np.ndarray:
    """Weighted mean of errors[:, w-1] (w = 1 most recent) over w <= usable, weights 2^-(w-1)."""
    weights = 0.5 ** np.arange(errors.shape[1])
    weights = np.where(np.arange(errors.shape[1]) < usable, weights, 0.0)
    known = ~np.isnan(errors)
    total = (known * weights).sum(axis=1)
    return np.where(known, errors, 0.0) @ weights / np.where(total > 0, total, 1.0)


def csp_from_grid(grid: np.ndarray, days: int, usable_errors: int) -> np.ndarray:
    """CSP on a lag grid: seasonal mean of D days + recent-weighted correction, floored at 0.

    With no known seasonal value the seasonal term is 0, so the correction alone (the weighted
    mean of recent loads) predicts: a new model degrades gracefully instead of failing.
    """
    seasonal = nan_mean(grid[:, :, 1:days + 1], axis=2)  # P[t - w] for w = 0..N
    errors = grid[:, 1:, 0] - seasonal[:, 1:]
    return np.maximum(seasonal[:, 0] + weighted_correction(errors, usable_errors), 0.0)


def csp_series(history: LoadHistory, series: np.ndarray, t: int, season: int, days: int,
               errors: int) -> np.ndarray:
    """The paper's CSP for window t: the correction uses n = min(i, N) errors of the same day."""
    grid = lag_grid(history, series, t, season, days, errors)
    return csp_from_grid(grid, days, min(t % season, errors))


def latest_known(history: LoadHistory, series: np.ndarray, t: int, horizon: int) -> np.ndarray:
    """The most recent known value among t-1 .. t-horizon (NaN if none)."""
    recent = history.lags(series, t, np.arange(1, horizon + 1))
    known = ~np.isnan(recent)
    first = np.argmax(known, axis=1)
    picked = recent[np.arange(len(recent)), first] if len(recent) else np.zeros(0)
    return np.where(known.any(axis=1), picked, np.nan)


def seasonal_naive_series(history: LoadHistory, series: np.ndarray, t: int, season: int) -> tuple[np.ndarray, np.ndarray]:
    """L[t - season], else the latest value of the last day, else 0; and whether it fell back."""
    same_window = history.lags(series, t, np.array([season]))[:, 0]
    fallback = np.nan_to_num(latest_known(history, series, t, season), nan=0.0)
    missing = np.isnan(same_window)
    return np.where(missing, fallback, same_window), missing


class Csp:
    """The paper's predictor for average and peak."""

    name = "csp"

    def __init__(self, season: int, days: int = 3, errors: int = 10):
        self.season, self.days, self.errors = season, days, errors

    def predict(self, history: LoadHistory, t: int) -> Predictions:
        avg = csp_series(history, history.avg, t, self.season, self.days, self.errors)
        peak = csp_series(history, history.peak, t, self.season, self.days, self.errors)
        return Predictions(avg, peak, [self.name] * len(avg))

    def learn(self, history: LoadHistory, t: int, avg: np.ndarray, peak: np.ndarray) -> None:
        """Stateless: everything it needs is in the history."""


class SeasonalNaive:
    """Same window yesterday; `seasonal_naive:last` where yesterday is unknown."""

    name = "seasonal_naive"

    def __init__(self, season: int):
        self.season = season

    def predict(self, history: LoadHistory, t: int) -> Predictions:
        avg, fell_back = seasonal_naive_series(history, history.avg, t, self.season)
        peak, _ = seasonal_naive_series(history, history.peak, t, self.season)
        methods = [self.name + (":last" if f else "") for f in fell_back]
        return Predictions(avg, peak, methods)

    def learn(self, history: LoadHistory, t: int, avg: np.ndarray, peak: np.ndarray) -> None:
        """Stateless."""
