"""Short periods in the forecaster core: detection on hand-made series (exact, fractional, noisy,
with gaps; none in trends, noise or constants) and our predictor foreseeing periodic bursts with no
day of history. No I/O."""

from __future__ import annotations

import numpy as np
import pytest

from services.forecaster.core.online import OnlineForecaster
from services.forecaster.core.periods import detect_periods, periodic_mean


def bursts(length: int, period: float, size: float = 20.0, offset: float = 0.0) -> np.ndarray:
    """A burst of `size` in the window where each period starts (periods may be fractional)."""
    series = np.zeros(length)
    starts = np.arange(offset, length, period)
    series[np.floor(starts).astype(int)] = size
    return series


def test_exact_fractional_and_noisy_periods_are_found():
    rng = np.random.default_rng(0)
    recent = np.stack([bursts(96, 6), bursts(96, 7.5), bursts(96, 9) + rng.uniform(0, 2, 96),
                       np.tile([0.0, 4.0, 9.0, 4.0], 24)])
    assert detect_periods(recent, max_period=24).tolist() == [6, 15, 9, 4]


def test_no_period_in_trends_noise_constants_or_too_short_history():
    rng = np.random.default_rng(1)
    walk = np.cumsum(rng.normal(0, 1, 96)) + 50
    recent = np.stack([walk, rng.poisson(5, 96).astype(float), np.full(96, 3.0), np.zeros(96),
                       np.linspace(0, 40, 96)])
    assert detect_periods(recent, max_period=24).tolist() == [0, 0, 0, 0, 0]
    assert detect_periods(bursts(50, 30)[None, :], max_period=40).tolist() == [0]  # one repeat: not enough


def test_unknown_windows_are_skipped():
    series = bursts(96, 6)
    series[:40] = np.nan  # a new model: only the last 56 windows are known
    series[70] = np.nan
    assert detect_periods(series[None, :], max_period=24).tolist() == [6]


def test_periodic_mean_by_hand():
    lagged = np.array([[9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])  # L[t - j]
    assert periodic_mean(lagged, np.array([2]))[0] == pytest.approx((2.0 + 4.0 + 6.0) / 3)
    assert periodic_mean(lagged, np.array([3]))[0] == pytest.approx((3.0 + 6.0) / 2)  # t - 9 is beyond
    assert np.isnan(periodic_mean(lagged, np.array([0]))[0])


def test_ours_foresees_periodic_bursts_after_three_periods_without_a_day():
    forecaster = OnlineForecaster("ours", 10.0, season_s=86400.0)  # 10 s windows, 8640 a day
    series = bursts(200, 7.5, offset=3.0)
    steady = 5.0
    foreseen, burst_windows = 0, 0
    for t in range(200):
        predicted = forecaster.forecast(t)
        if t >= 3 * 15 and series[t] > 0:  # after three periods (of 15 windows: 2 bursts each)
            burst_windows += 1
            foreseen += predicted["batch"].peak >= 10.0
            assert predicted["batch"].method.startswith("ours:period")
        forecaster.observe(t, {"batch": (series[t] / 2, series[t]), "steady": (steady, steady)})
    assert burst_windows >= 15 and foreseen == burst_windows
    assert forecaster.forecast(200)["steady"].avg == pytest.approx(steady)
