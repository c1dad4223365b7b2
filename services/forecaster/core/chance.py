"""The chance that a model gets any request in a window: the share of comparable past windows that
had one (the same time of day on each earlier season the history holds, a few windows either side,
and the most recent windows). A sparse model's predicted load rounds to nothing while its next
request is still likely; placement ranks idle models' standby copies by this. Pure, no I/O.
"""

from __future__ import annotations

import numpy as np

from services.forecaster.core.history import LoadHistory

SAME_TIME_SPAN = 2  # windows either side of the same time in an earlier season
SEASONS = 7  # earlier seasons looked at
RECENT = 12  # most recent windows


def comparable_offsets(season: int) -> np.ndarray:
    """Offsets (t - offset) of the windows that window t is compared with, each once."""
    same_time = season * np.arange(1, SEASONS + 1)[:, None] + np.arange(-SAME_TIME_SPAN, SAME_TIME_SPAN + 1)
    return np.unique(np.concatenate([np.arange(1, RECENT + 1), same_time.ravel()]).clip(min=1))


def request_chance(history: LoadHistory, t: int, season: int) -> np.ndarray:
    """Per model row: the share of known comparable windows with any request (0.0 with none known)."""
    peaks = history.lags(history.peak, t, comparable_offsets(season))
    known = (~np.isnan(peaks)).sum(axis=1)
    active = (np.nan_to_num(peaks) > 0).sum(axis=1)
    return np.where(known > 0, active / np.maximum(known, 1), 0.0)
