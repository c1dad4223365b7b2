"""Per-model window history as ring buffers, indexed by absolute window index.

Every predictor reads the past through `lags`: values at `t - offset` for all models at once, NaN
where the window is unknown (never observed, a gap, or older than the buffer). Pure, no I/O.
"""

from __future__ import annotations

import numpy as np


class LoadHistory:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.rows: dict[str, int] = {}
        self.avg = np.full((0, capacity), np.nan)
        self.peak = np.full((0, capacity), np.nan)
        self.latest: int | None = None  # largest window index recorded so far

    @property
    def models(self) -> list[str]:
        return list(self.rows)

    def row(self, model: str) -> int:
        """The model's row, adding an all-unknown one for a new model."""
        row = self.rows.get(model)
        if row is None:
            row = self.rows[model] = len(self.rows)
            if row >= len(self.avg):
                grow = np.full((max(8, len(self.avg)), self.capacity), np.nan)
                self.avg = np.vstack([self.avg, grow])
                self.peak = np.vstack([self.peak, grow.copy()])
        return row

    def record(self, index: int, rows: np.ndarray, avg: np.ndarray, peak: np.ndarray) -> None:
        """Store window `index` for the given rows; windows skipped since the latest become unknown."""
        if self.latest is None or index > self.latest:
            start = index - self.capacity + 1 if self.latest is None else self.latest + 1
            cleared = np.arange(max(start, index - self.capacity + 1), index + 1) % self.capacity
            self.avg[:, cleared] = np.nan
            self.peak[:, cleared] = np.nan
            self.latest = index
        elif index <= self.latest - self.capacity:
            return  # older than the buffer holds
        self.avg[rows, index % self.capacity] = avg
        self.peak[rows, index % self.capacity] = peak

    def lags(self, series: np.ndarray, t: int, offsets: np.ndarray) -> np.ndarray:
        """series[:, t - offsets] for the models' rows: shape (n_models, *offsets.shape)."""
        n = len(self.rows)
        if self.latest is None:
            return np.full((n, *offsets.shape), np.nan)
        index = t - offsets
        known = (index <= self.latest) & (index > self.latest - self.capacity)
        values = series[:n][:, index % self.capacity]
        return np.where(known, values, np.nan)
