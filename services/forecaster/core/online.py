"""The one forecasting interface used by the service, the simulator and the backtest.

An OnlineForecaster is fed completed windows in time order (`observe`) and asked for the next
window (`forecast`); the caller owns the clock (window indices come in as arguments). Methods:
ours, csp, seasonal_naive. Pure, no I/O: a restarted service rebuilds it by replaying its history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from services.forecaster.core.chance import request_chance
from services.forecaster.core.history import LoadHistory
from services.forecaster.core.ours import LONG_DAYS, Ours
from services.forecaster.core.predictors import Csp, Predictions, SeasonalNaive
from services.forecaster.core.windows import DAY_S, season_length

METHODS = ("ours", "csp", "seasonal_naive")


@dataclass(frozen=True)
class Prediction:
    avg: float  # predicted time-weighted mean outstanding requests
    peak: float  # predicted peak outstanding requests
    method: str  # which predictor produced it (e.g. "csp", "ours:csp7/ratio")
    chance: float = 0.0  # probability of at least one request in the window (core.chance)


def make_predictor(method: str, season: int, csp_days: int, csp_errors: int):
    if method == "ours":
        return Ours(season, csp_days, csp_errors)
    if method == "csp":
        return Csp(season, csp_days, csp_errors)
    if method == "seasonal_naive":
        return SeasonalNaive(season)
    raise ValueError(f"unknown forecast method {method!r} (choose {', '.join(METHODS)})")


class OnlineForecaster:
    def __init__(self, method: str, window_s: float, csp_days: int = 3, csp_errors: int = 10,
                 season_s: float = DAY_S):
        self.method = method
        self.window_s = window_s
        self.season = season_length(window_s, season_s)
        self.predictor = make_predictor(method, self.season, csp_days, csp_errors)
        self.history = LoadHistory((max(LONG_DAYS, csp_days) + 1) * self.season + csp_errors + 1)

    @property
    def models(self) -> list[str]:
        return self.history.models

    def add_model(self, model: str) -> None:
        """Make a model known before its first window (it is forecast from then on)."""
        self.history.row(model)

    def observe_rows(self, t: int, avg: np.ndarray, peak: np.ndarray) -> None:
        """Completed window t for every known model, in row order (NaN: unknown)."""
        n = len(self.history.rows)
        self.predictor.learn(self.history, t, avg[:n], peak[:n])
        rows = np.flatnonzero(~np.isnan(avg[:n]))
        self.history.record(t, rows, avg[rows], peak[rows])

    def observe(self, t: int, loads: Mapping[str, tuple[float, float]]) -> None:
        """Completed window t: (avg, peak) per model; known models left out are unknown for t."""
        for model in loads:
            self.history.row(model)
        n = len(self.history.rows)
        avg, peak = np.full(n, np.nan), np.full(n, np.nan)
        for model, (a, p) in loads.items():
            row = self.history.rows[model]
            avg[row], peak[row] = a, p
        self.observe_rows(t, avg, peak)

    def forecast_rows(self, t: int) -> Predictions:
        return self.predictor.predict(self.history, t)

    def forecast(self, t: int) -> dict[str, Prediction]:
        """Predictions for window t for every known model."""
        predicted = self.forecast_rows(t)
        chance = request_chance(self.history, t, self.season)
        return {model: Prediction(float(predicted.avg[row]), float(predicted.peak[row]), predicted.methods[row],
                                  float(chance[row]))
                for model, row in self.history.rows.items()}
