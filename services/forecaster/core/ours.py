"""Our predictor: per-model online selection among cheap experts by their recent absolute error.

Experts per series (average and peak): the paper's CSP, CSP over 7 days (with the day-reset and
with a continuous correction), the last known value, a recent-weighted mean, seasonal naive, the
same phase of a period shorter than the season found in the recent windows (core.periods); for
the peak also the predicted average times the model's peak/average ratio (of EW means). Each model
follows the expert with the lowest exponentially weighted absolute error on that model; unknown
windows (new model, gaps) are skipped by every expert. Pure, no I/O; state = the error scores.
"""

from __future__ import annotations

import numpy as np

from services.forecaster.core.history import LoadHistory
from services.forecaster.core.periods import PERIODS_AVERAGED, detect_periods, periodic_mean
from services.forecaster.core.predictors import Predictions, csp_from_grid, lag_grid, weighted_correction

SERIES_EXPERTS = ("csp", "csp7", "csp7c", "last", "recent", "snaive", "period")
PEAK_EXPERTS = SERIES_EXPERTS + ("ratio",)
LONG_DAYS = 7
MAX_PERIOD_WINDOWS = 288  # longest short period looked for (and at most half a season)
PERIOD_HISTORY_PERIODS = 4  # periods are detected in the last 4 x the longest period's windows


def _grow(array: np.ndarray, rows: int, fill: float) -> np.ndarray:
    if len(array) >= rows:
        return array
    return np.vstack([array, np.full((rows - len(array), *array.shape[1:]), fill)])


class Ours:
    name = "ours"

    def __init__(self, season: int, days: int = 3, errors: int = 10, error_decay: float = 0.05):
        self.season, self.days, self.errors = season, days, errors
        self.error_decay = error_decay  # weight of the newest absolute error in each score
        self.avg_scores = np.zeros((0, len(SERIES_EXPERTS)))
        self.peak_scores = np.zeros((0, len(PEAK_EXPERTS)))
        self.level = np.zeros((0, 2))  # per model: EW mean of the average and of the peak (NaN: unseen)
        self._cached: tuple[int, int, np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------ experts

    @property
    def max_period(self) -> int:
        return min(self.season // 2, MAX_PERIOD_WINDOWS)

    def periods(self, history: LoadHistory, t: int) -> np.ndarray:
        """Per model the period (windows) found in the average load before window t; 0: none."""
        recent = history.lags(history.avg, t, np.arange(PERIOD_HISTORY_PERIODS * self.max_period, 0, -1))
        return detect_periods(recent, self.max_period)

    def _series_experts(self, history: LoadHistory, series: np.ndarray, t: int, periods: np.ndarray) -> np.ndarray:
        """(n_models, len(SERIES_EXPERTS)) predictions for window t; NaN where an expert cannot say."""
        grid = lag_grid(history, series, t, self.season, max(LONG_DAYS, self.days), self.errors)
        same_day = min(t % self.season, self.errors)
        recent = grid[:, 1:, 0]
        known = ~np.isnan(recent)
        any_known = known.any(axis=1)
        last = recent[np.arange(len(recent)), np.argmax(known, axis=1)] if len(recent) else np.zeros(0)
        seasonal_known = ~np.isnan(grid[:, 0, 1:])  # the target's window on previous days
        short = np.where(seasonal_known[:, :self.days].any(axis=1), 0.0, np.nan)  # NaN: no seasonal term
        long = np.where(seasonal_known.any(axis=1), 0.0, np.nan)
        experts = np.stack([
            csp_from_grid(grid, self.days, same_day) + short,
            csp_from_grid(grid, LONG_DAYS, same_day) + long,
            csp_from_grid(grid, LONG_DAYS, self.errors) + long,
            np.where(any_known, last, np.nan),
            np.where(any_known, weighted_correction(recent, self.errors), np.nan),
            grid[:, 0, 1],
            periodic_mean(history.lags(series, t, np.arange(PERIODS_AVERAGED * self.max_period + 1)), periods),
        ], axis=1)
        return experts

    def _experts(self, history: LoadHistory, t: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(history.rows)
        if self._cached and self._cached[:2] == (t, n):
            return self._cached[2], self._cached[3]
        self.avg_scores = _grow(self.avg_scores, n, 0.0)
        self.peak_scores = _grow(self.peak_scores, n, 0.0)
        self.level = _grow(self.level, n, np.nan)
        periods = self.periods(history, t)
        avg = self._series_experts(history, history.avg, t, periods)
        chosen_avg = _pick(avg, self.avg_scores[:n])
        ratio = self.level[:n, 1] / np.where(self.level[:n, 0] > 0, self.level[:n, 0], np.nan)
        peak = np.concatenate([self._series_experts(history, history.peak, t, periods),
                               (chosen_avg * ratio)[:, None]], axis=1)
        self._cached = (t, n, avg, peak)
        return avg, peak

    # ------------------------------------------------------------ interface

    def predict(self, history: LoadHistory, t: int) -> Predictions:
        avg_experts, peak_experts = self._experts(history, t)
        n = len(avg_experts)
        avg_choice = _choice(avg_experts, self.avg_scores[:n])
        peak_choice = _choice(peak_experts, self.peak_scores[:n])
        rows = np.arange(n)
        avg = np.nan_to_num(avg_experts[rows, avg_choice], nan=0.0)
        peak = np.nan_to_num(peak_experts[rows, peak_choice], nan=0.0)
        methods = [_label(avg_experts[r, a], SERIES_EXPERTS[a], PEAK_EXPERTS[p])
                   for r, a, p in zip(rows, avg_choice, peak_choice)]
        return Predictions(avg, np.maximum(peak, avg), methods)

    def learn(self, history: LoadHistory, t: int, avg: np.ndarray, peak: np.ndarray) -> None:
        """Score every expert on the completed window t (rows of `avg`/`peak` = history rows)."""
        avg_experts, peak_experts = self._experts(history, t)
        n = len(avg_experts)
        decay = self.error_decay
        for scores, experts, actual in ((self.avg_scores, avg_experts, avg[:n]),
                                        (self.peak_scores, peak_experts, peak[:n])):
            error = np.abs(experts - actual[:, None])
            usable = ~np.isnan(error)
            scores[:n] = np.where(usable, (1 - decay) * scores[:n] + decay * np.nan_to_num(error), scores[:n])
        actual = np.stack([avg[:n], peak[:n]], axis=1)
        seen, old = ~np.isnan(actual), self.level[:n]
        self.level[:n] = np.where(seen, np.where(np.isnan(old), actual, (1 - decay) * old + decay * actual), old)


def _choice(experts: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Index of the lowest-scored expert able to predict (the first on ties, the paper's CSP)."""
    return np.argmin(np.where(np.isnan(experts), np.inf, scores), axis=1)


def _pick(experts: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return experts[np.arange(len(experts)), _choice(experts, scores)]


def _label(avg_value: float, avg_expert: str, peak_expert: str) -> str:
    if np.isnan(avg_value):
        return "ours:none"
    return f"ours:{avg_expert}" if avg_expert == peak_expert else f"ours:{avg_expert}/{peak_expert}"
