"""Forecast accuracy as in DESIGN.md §3.1, over (model, window) arrays. Pure.

accuracy = 1 - sum|pred - actual| / sum actual; empty windows (actual 0) count in both sums (their
error is whatever was predicted). Mean relative error = mean of |pred - actual| / actual over the
non-empty windows only (it is undefined on empty ones); the number of empty windows is reported.
Onsets foreseen: of the windows where a model goes from idle to busy, the share whose predicted
peak was high enough for the placer to place a copy ahead of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def accuracy(predicted: np.ndarray, actual: np.ndarray) -> float:
    total = float(np.sum(actual))
    return 1.0 - float(np.sum(np.abs(predicted - actual))) / total if total > 0 else float("nan")


def mean_relative_error(predicted: np.ndarray, actual: np.ndarray) -> float:
    busy = actual > 0
    return float(np.mean(np.abs(predicted[busy] - actual[busy]) / actual[busy])) if busy.any() else float("nan")


IDLE_PEAK = 0.5  # a window whose peak is below this is idle; a predicted peak at or above it places a copy


def onsets_foreseen(predicted_peak: np.ndarray, actual_peak: np.ndarray) -> tuple[float, int]:
    """(share foreseen, number of onsets): onsets are windows with peak >= 1 after an idle window."""
    onset = (actual_peak[:, 1:] >= 1.0) & (actual_peak[:, :-1] < IDLE_PEAK)
    count = int(onset.sum())
    foreseen = int((onset & (predicted_peak[:, 1:] >= IDLE_PEAK)).sum())
    return (foreseen / count if count else float("nan")), count


@dataclass(frozen=True)
class Score:
    overall: float  # accuracy over every model and window
    per_model: list[float]  # accuracy of each model (row)
    median_model: float  # median of per_model
    mre: float  # mean relative error over non-empty windows
    empty_windows: int  # windows with actual 0 (left out of the MRE)


def score(predicted: np.ndarray, actual: np.ndarray) -> Score:
    """predicted, actual: (models, windows)."""
    per_model = [accuracy(p, a) for p, a in zip(predicted, actual)]
    return Score(overall=accuracy(predicted, actual), per_model=per_model,
                 median_model=float(np.nanmedian(per_model)), mre=mean_relative_error(predicted, actual),
                 empty_windows=int(np.sum(actual <= 0)))
