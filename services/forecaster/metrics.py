"""Prometheus metrics of the forecaster, in a registry of their own: the published forecast per
model, the last closed window's observed load, and that window's forecast error per model and method.

Load is in outstanding requests (time-weighted average and peak over a window), as everywhere else.
"""

from __future__ import annotations

from typing import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from shared.schemas import Forecast


class ForecasterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.forecast = Gauge("warmserve_forecaster_forecast", "forecast load of the current window (outstanding "
                              "requests: avg or peak)", ["model", "stat"], registry=self.registry)
        self.forecast_window = Gauge("warmserve_forecaster_forecast_window_start_seconds",
                                     "unix start of the window the published forecasts are for",
                                     registry=self.registry)
        self.actual = Gauge("warmserve_forecaster_actual", "observed load of the last closed window "
                            "(outstanding requests: avg or peak)", ["model", "stat"], registry=self.registry)
        self.error = Gauge("warmserve_forecaster_abs_error", "|forecast - observed| of the last closed window, "
                           "by the method that forecast it", ["model", "method", "stat"], registry=self.registry)
        self.windows = Counter("warmserve_forecaster_windows_closed", "windows closed and recorded",
                               registry=self.registry)

    def published(self, window_start_s: float, forecasts: Mapping[str, Forecast]) -> None:
        self.forecast.clear()
        self.forecast_window.set(window_start_s)
        for model, f in forecasts.items():
            self.forecast.labels(model, "avg").set(f.avg)
            self.forecast.labels(model, "peak").set(f.peak)

    def window_closed(self, window_start_s: float, loads: Mapping[str, tuple[float, float]],
                      forecasts: Mapping[str, Forecast]) -> None:
        """The window's observed (avg, peak) per model, and the error of the forecasts made for it."""
        self.windows.inc()
        self.actual.clear()
        self.error.clear()
        for model, (avg, peak) in loads.items():
            self.actual.labels(model, "avg").set(avg)
            self.actual.labels(model, "peak").set(peak)
            f = forecasts.get(model)
            if f is not None and abs(f.window_start_s - window_start_s) < 1e-6:
                self.error.labels(model, f.method, "avg").set(abs(f.avg - avg))
                self.error.labels(model, f.method, "peak").set(abs(f.peak - peak))

    def render(self) -> bytes:
        return generate_latest(self.registry)
