"""The backtest command on a tiny workload (JSON report, table, plot), on the synthetic periodic
trace (our short-period expert foresees the bursts, CSP does not), and the statsmodels baselines on
small periodic series (one-step-ahead, fitted on the training part only)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.forecaster import backtest
from services.forecaster.core.baselines import holt_winters_one_step, sarima_one_step


@pytest.mark.parametrize("one_step", [holt_winters_one_step, sarima_one_step])
def test_statsmodels_baselines_follow_a_daily_pattern(one_step):
    rng = np.random.default_rng(0)
    season = 6
    series = np.tile([1.0, 5.0, 9.0, 6.0, 3.0, 2.0], 10) + rng.normal(0, 0.1, 60)
    predicted = one_step(series, 36, season)
    assert predicted.shape == (24,) and np.all(predicted >= 0)
    assert np.mean(np.abs(predicted - series[36:])) < 0.5


@pytest.mark.slow
def test_backtest_command_reports_every_method(tmp_path, capsys):
    plot = tmp_path / "plot.png"
    argv = ["backtest", "--models", "2", "--rate", "0.5", "--window", "2400", "--json",
            "--methods", "ours,csp,seasonal_naive,holt_winters", "--plot", str(plot)]
    assert backtest.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["results"]) == {"ours", "csp", "seasonal_naive", "holt_winters"}
    ours = report["results"]["ours"]
    assert len(ours["avg"]["per_model"]) == 2 and ours["avg"]["overall"] <= 1.0
    assert all(label.startswith("ours:") for label in ours["methods_used"])
    assert report["workload"]["eval_days"] == 7 and plot.stat().st_size > 10_000
    assert backtest.main(["backtest", "--models", "1", "--rate", "0.5", "--window", "2400",
                          "--methods", "csp", "--plot", str(plot)]) == 0
    assert "accuracy = 1 - sum|pred-actual|/sum actual" in capsys.readouterr().out


def test_periodic_trace_bursts_are_foreseen_by_ours_only(tmp_path, capsys):
    argv = ["backtest", "--trace", "periodic", "--models", "4", "--window", "300", "--train-days", "1", "--json",
            "--methods", "ours,csp", "--plot", str(tmp_path / "p.png")]
    assert backtest.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    ours, csp = report["results"]["ours"], report["results"]["csp"]
    assert ours["onsets"] > 50 and ours["onsets_foreseen"] >= 0.9 > csp["onsets_foreseen"]
    assert ours["peak"]["overall"] > csp["peak"]["overall"]
    assert any(label.startswith("ours:period") for label in ours["methods_used"])


def test_backtest_refuses_unknown_methods():
    with pytest.raises(SystemExit):
        backtest.parse_args(["--methods", "ours,prophet"])
