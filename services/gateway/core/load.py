"""Per-model load meter: outstanding requests (queued + running) integrated over time.

Pure: the caller reports every change with the time it happened and asks for a sample at the end
of each interval; the meter returns the time-weighted average, the peak and the arrivals.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.schemas import LoadSample


@dataclass
class _Level:
    outstanding: int = 0
    changed_s: float = 0.0  # when `outstanding` last changed (or the interval started)
    area: float = 0.0  # integral of outstanding over the interval so far
    peak: int = 0
    arrivals: int = 0


class LoadMeter:
    def __init__(self, now_s: float, source: str = ""):
        self.source = source  # names this meter's samples (its gateway)
        self._interval_start_s = now_s
        self._levels: dict[str, _Level] = {}

    def outstanding(self, model: str) -> int:
        level = self._levels.get(model)
        return level.outstanding if level else 0

    def change(self, model: str, delta: int, now_s: float, arrival: bool = False) -> None:
        level = self._levels.get(model)
        if level is None:
            level = self._levels[model] = _Level(changed_s=self._interval_start_s)
        level.area += level.outstanding * (now_s - level.changed_s)
        level.outstanding += delta
        level.changed_s = now_s
        level.peak = max(level.peak, level.outstanding)
        level.arrivals += arrival

    def sample(self, now_s: float, at_s: float) -> list[LoadSample]:
        """Close the interval ending at `now_s` (reported as unix time `at_s`): one sample per model seen."""
        interval_s = now_s - self._interval_start_s
        if interval_s <= 0:
            return []
        samples = []
        for model, level in self._levels.items():
            area = level.area + level.outstanding * (now_s - level.changed_s)
            samples.append(LoadSample(model=model, at_s=at_s, interval_s=interval_s,
                                      avg_outstanding=area / interval_s, peak_outstanding=level.peak,
                                      arrivals=level.arrivals, source=self.source))
            level.area, level.changed_s, level.peak, level.arrivals = 0.0, now_s, level.outstanding, 0
        self._interval_start_s = now_s
        return samples
