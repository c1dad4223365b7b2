"""Forecaster core: window maths, history, CSP by hand, seasonal naive, our predictor (new model,
gaps, expert selection), metrics. Small hand-made series, no I/O."""

from __future__ import annotations

import numpy as np
import pytest

from services.forecaster.core.history import LoadHistory
from services.forecaster.core.metrics import accuracy, mean_relative_error, score
from services.forecaster.core.online import OnlineForecaster
from services.forecaster.core.predictors import csp_series, weighted_correction
from services.forecaster.core.windows import (PartialWindows, RequestTiming, add_sample, close_window,
                                              sample_problem, trace_windows, window_index)
from shared.schemas import LoadSample

DAY4_WINDOW_S = 21600.0  # four windows per day keeps hand calculations small


def history_of(values: list[float], capacity: int = 64) -> LoadHistory:
    history = LoadHistory(capacity)
    row = history.row("m")
    for t, v in enumerate(values):
        if not np.isnan(v):
            history.record(t, np.array([row]), np.array([v]), np.array([v]))
    return history


# ---------------------------------------------------------------- window maths


def test_trace_windows_by_hand():
    # outstanding: [1,5) [2,17) [12,13) with 10 s windows
    avg, peak = trace_windows(np.array([1.0, 2.0, 12.0]), np.array([4.0, 15.0, 1.0]), 10.0, 3)
    assert avg == pytest.approx([1.2, 0.8, 0.0])
    assert peak.tolist() == [2.0, 2.0, 0.0]


def test_trace_windows_carry_over_without_arrivals():
    avg, peak = trace_windows(np.array([5.0]), np.array([30.0]), 10.0, 4)
    assert avg == pytest.approx([0.5, 1.0, 1.0, 0.5]) and peak.tolist() == [1, 1, 1, 1]


def test_request_timing_durations():
    timing = RequestTiming(prefill_s_per_token=0.001, decode_s_per_token=0.1)
    assert timing.durations(np.array([1000]), np.array([10])) == pytest.approx([2.0])


def sample(at_s: float, avg: float = 2.0, peak: float = 3.0, interval_s: float = 1.0, model: str = "m") -> LoadSample:
    return LoadSample(model=model, at_s=at_s, interval_s=interval_s, avg_outstanding=avg, peak_outstanding=peak)


def test_samples_split_over_windows_and_late_part_dropped():
    partial, late = add_sample(PartialWindows(), sample(11.0, interval_s=2.0), 10.0, first_open_start_s=0.0)
    assert late == 0 and [(w.window_start_s, w.load_s, w.covered_s) for w in partial.windows] == [(0.0, 2.0, 1.0), (10.0, 2.0, 1.0)]
    partial, late = add_sample(partial, sample(11.0, interval_s=2.0), 10.0, first_open_start_s=10.0)
    assert late == 1.0 and partial.windows[1].covered_s == 2.0
    stats, rest = close_window(partial, 10.0, 10.0)
    assert stats.avg == pytest.approx(0.4) and stats.peak == 3.0 and stats.covered_s == 2.0
    assert [w.window_start_s for w in rest.windows] == []


def test_closing_a_window_without_samples_gives_zero_load():
    stats, _ = close_window(PartialWindows(), 30.0, 10.0)
    assert (stats.avg, stats.peak, stats.covered_s) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("bad,reason", [
    (sample(5.0, avg=3.0, peak=1.0), "peak_outstanding below"),
    (sample(5.0, interval_s=20.0), "longer than the window"),
    (sample(500.0), "future"),
    (LoadSample.model_construct(model="m", at_s=5.0, interval_s=1.0, avg_outstanding=float("inf"),
                                peak_outstanding=float("inf")), "non-finite"),  # as a lenient decoder might
    (sample(5.0, model=" "), "empty model"),
])
def test_semantic_sample_problems(bad, reason):
    assert reason in sample_problem(bad, now_s=10.0, window_s=10.0)
    assert sample_problem(sample(5.0), now_s=10.0, window_s=10.0) is None


def test_window_index_is_aligned_to_multiples():
    assert [window_index(t, 300.0) for t in (0.0, 299.999, 300.0, 600.0)] == [0, 0, 1, 2]


# ---------------------------------------------------------------- history


def test_history_ring_forgets_old_and_marks_gaps_unknown():
    history = history_of([1, 2, 3, 4, 5, 6], capacity=4)
    np.testing.assert_array_equal(history.lags(history.avg, 6, np.array([1, 2, 4, 5])), [[6, 5, 3, np.nan]])
    history.record(9, np.array([0]), np.array([9.0]), np.array([9.0]))  # 7 and 8 skipped
    assert np.isnan(history.lags(history.avg, 9, np.array([1, 2]))).all()
    np.testing.assert_array_equal(history.lags(history.avg, 10, np.array([1, 5])), [[9.0, np.nan]])  # 5 forgotten


# ---------------------------------------------------------------- CSP


def test_csp_by_hand():
    # season 4, D = 2, N = 3; day0 [1,2,3,4], day1 [3,4,5,6], day2 [5,8] -> predict day2 window 2 (t = 10)
    history = history_of([1, 2, 3, 4, 3, 4, 5, 6, 5, 8])
    # P[10] = (5+3)/2 = 4; e1 = 8 - (4+2)/2 = 5; e2 = 5 - (3+1)/2 = 3; correction (5*1 + 3*0.5)/1.5
    assert csp_series(history, history.avg, 10, season=4, days=2, errors=3)[0] == pytest.approx(4 + 6.5 / 1.5)
    # first window of a day: n = min(i, N) = 0, the seasonal term alone
    assert csp_series(history, history.avg, 8, season=4, days=2, errors=3)[0] == pytest.approx(2.0)


def test_csp_floors_at_zero_and_uses_available_days():
    history = history_of([9, 9, 9, 1, 0, 0, 0])  # P[7] = 1, every error -9
    assert csp_series(history, history.avg, 7, season=4, days=3, errors=10)[0] == 0.0
    history = history_of([1, 2, 3, 4])  # D = 3 asked, one day known
    assert csp_series(history, history.avg, 4, season=4, days=3, errors=10)[0] == 1.0


@pytest.mark.parametrize("w", [1, 2, 5, 10])
def test_csp_weights_halve_with_age(w):
    errors = np.zeros((1, 10))
    errors[0, w - 1] = 1.0
    assert weighted_correction(errors, 10)[0] == pytest.approx(2.0 ** -(w - 1) / sum(2.0 ** -k for k in range(10)))


def test_csp_correction_skips_unknown_errors():
    errors = np.array([[np.nan, 4.0, np.nan]])
    assert weighted_correction(errors, 3)[0] == pytest.approx(4.0)
    assert weighted_correction(np.full((1, 3), np.nan), 3)[0] == 0.0


def test_csp_forecaster_uses_settings_window():
    forecaster = OnlineForecaster("csp", DAY4_WINDOW_S, csp_days=1, csp_errors=2)
    for t, v in enumerate([1, 2, 3, 4, 2, 4]):
        forecaster.observe(t, {"m": (v, 2 * v)})
    predicted = forecaster.forecast(6)["m"]
    # P = 3, errors: e1 = 4-2 = 2, e2 = 2-1 = 1 -> 3 + (2 + 0.5)/1.5
    assert predicted.avg == pytest.approx(3 + 2.5 / 1.5) and predicted.method == "csp"
    assert predicted.peak == pytest.approx(2 * predicted.avg)


def test_compressed_season_is_the_settings_season():
    """A day compressed to 40 s with 10 s windows: the seasonal term is four windows back."""
    forecaster = OnlineForecaster("csp", 10.0, csp_days=1, csp_errors=2, season_s=40.0)
    assert forecaster.season == 4
    for t, v in enumerate([1, 2, 3, 4, 2, 4]):
        forecaster.observe(t, {"m": (v, 2 * v)})
    assert forecaster.forecast(6)["m"].avg == pytest.approx(3 + 2.5 / 1.5)  # as with 4 windows a day


def test_request_chance_is_the_share_of_comparable_windows_with_a_request():
    """Season of 100 windows: window 250 is compared with the 12 before it and with 148..152 and
    48..52 (the same time one and two seasons back); unknown windows do not count."""
    forecaster = OnlineForecaster("ours", 10.0, season_s=1000.0)
    for t in range(250):
        busy = t in (49, 150, 151, 240)  # two of 5 windows a season back, one of 5 two back, one recent
        forecaster.observe(t, {"sparse": (0.1 if busy else 0.0, 1.0 if busy else 0.0), "idle": (0.0, 0.0)})
    forecaster.add_model("new")
    got = forecaster.forecast(250)
    assert got["sparse"].chance == pytest.approx(4 / 22)
    assert got["idle"].chance == 0.0 and got["new"].chance == 0.0  # nothing known: no chance claimed


# ---------------------------------------------------------------- seasonal naive


def test_seasonal_naive_and_its_fallback():
    forecaster = OnlineForecaster("seasonal_naive", DAY4_WINDOW_S)
    for t, v in enumerate([1, 2, 3]):
        forecaster.observe(t, {"m": (v, v)})
    assert (forecaster.forecast(3)["m"].avg, forecaster.forecast(3)["m"].method) == (3, "seasonal_naive:last")
    forecaster.observe(3, {"m": (4, 4)})
    assert (forecaster.forecast(5)["m"].avg, forecaster.forecast(5)["m"].method) == (2, "seasonal_naive")


# ---------------------------------------------------------------- ours


def test_ours_new_model_says_none_then_follows_its_load():
    forecaster = OnlineForecaster("ours", 300.0)
    forecaster.add_model("new")
    first = forecaster.forecast(100)["new"]
    assert (first.avg, first.peak, first.method) == (0.0, 0.0, "ours:none")
    forecaster.observe(100, {"new": (5.0, 8.0)})
    second = forecaster.forecast(101)["new"]
    assert second.avg > 0 and second.peak >= second.avg and second.method.startswith("ours:")
    assert second.method != "ours:none"


def test_ours_after_a_gap_longer_than_recent_errors():
    forecaster = OnlineForecaster("ours", DAY4_WINDOW_S)
    for t in range(12):  # three days of a daily pattern
        forecaster.observe(t, {"m": (float(1 + t % 4), float(2 + t % 4))})
    after_gap = forecaster.forecast(30)["m"]  # windows 12..29 never observed
    assert after_gap.method != "ours:none"
    assert after_gap.avg == pytest.approx(3.0)  # same window of the last known days (30 % 4 = 2)


def test_ours_learns_which_expert_fits_each_model():
    season = 4
    forecaster = OnlineForecaster("ours", DAY4_WINDOW_S)
    rng = np.random.default_rng(0)
    level = 10.0
    for t in range(40 * season):
        level = max(level + rng.normal(0, 3), 0.0)  # random walk: the last value is best
        periodic = [1.0, 9.0, 2.0, 7.0][t % season]  # exact daily pattern: seasonal experts are best
        forecaster.observe(t, {"walk": (level, level), "daily": (periodic, periodic)})
    predicted = forecaster.forecast(40 * season)
    assert predicted["walk"].method == "ours:last"
    assert predicted["daily"].avg == pytest.approx(1.0) and predicted["daily"].method != "ours:last"


def test_ours_peak_never_below_average_and_methods_named():
    forecaster = OnlineForecaster("ours", DAY4_WINDOW_S)
    for t in range(20):
        forecaster.observe(t, {"a": (4.0 + t % 3, 9.0 + t % 2), "b": (0.0, 0.0)})
    predicted = forecaster.forecast(20)
    assert all(p.peak >= p.avg >= 0 for p in predicted.values())
    assert all(p.method.startswith("ours:") for p in predicted.values())


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown forecast method"):
        OnlineForecaster("magic", 300.0)


# ---------------------------------------------------------------- metrics


def test_accuracy_and_relative_error_with_empty_windows():
    actual = np.array([[0.0, 2.0, 4.0]])
    predicted = np.array([[1.0, 2.0, 2.0]])
    assert accuracy(predicted, actual) == pytest.approx(1 - 3 / 6)
    assert mean_relative_error(predicted, actual) == pytest.approx((0 + 0.5) / 2)
    result = score(predicted, actual)
    assert result.empty_windows == 1 and result.per_model == [pytest.approx(0.5)]
