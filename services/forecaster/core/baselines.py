"""statsmodels baselines for the backtest: Holt-Winters and SARIMA, one-step-ahead forecasts.

Each is fitted once on the training part of a series and then filtered forward over the rest with
the fitted parameters (no refit per window), so every forecast uses only earlier windows. Batch
only (no new-model or gap handling): the live service uses core.online. Pure, no I/O.
"""

from __future__ import annotations

import warnings

import numpy as np
from statsmodels.tsa.holtwinters import ExponentialSmoothing
from statsmodels.tsa.statespace.sarimax import SARIMAX

SARIMA_ORDER = (1, 0, 1)  # on the seasonally differenced series: SARIMA(1,0,1)(0,1,0)[season]


def holt_winters_one_step(series: np.ndarray, train: int, season: int) -> np.ndarray:
    """Additive daily-seasonal Holt-Winters (no trend); forecasts for series[train:]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = ExponentialSmoothing(series[:train], trend=None, seasonal="add", seasonal_periods=season,
                                      initialization_method="heuristic").fit()
        params = fitted.params
        full = ExponentialSmoothing(series, trend=None, seasonal="add", seasonal_periods=season,
                                    initialization_method="known", initial_level=params["initial_level"],
                                    initial_seasonal=params["initial_seasons"])
        forward = full.fit(smoothing_level=params["smoothing_level"],
                           smoothing_seasonal=params["smoothing_seasonal"], optimized=False)
    return np.maximum(np.asarray(forward.fittedvalues)[train:], 0.0)


def sarima_one_step(series: np.ndarray, train: int, season: int) -> np.ndarray:
    """SARIMA(1,0,1)(0,1,0)[season] with a constant; forecasts for series[train:].

    The seasonal difference is taken explicitly (a seasonal state of 288 lags would make the
    Kalman filter too slow); the ARMA part is fitted on the training differences, then applied.
    """
    diff = series[season:] - series[:-season]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = SARIMAX(diff[:train - season], order=SARIMA_ORDER, trend="c").fit(disp=False)
        forward = fitted.apply(diff)
    predicted_diff = np.asarray(forward.fittedvalues)  # one step ahead for diff[k], k >= 0
    predicted = series[:-season] + predicted_diff  # for series[season:]
    return np.maximum(predicted[train - season:], 0.0)
