"""Compressed replay of the shared workload: the live windows an import seeds hold the trace's
requests moved onto the live clock (a day in 24 min), lengths unchanged; CSV shifting."""

from __future__ import annotations

import numpy as np
import pytest

from services.forecaster.core.replay import Compression, history_windows
from services.forecaster.core.windows import RequestTiming
from shared.schemas import WindowLoad
from shared.workload import DAY_S, build_workload
from warmserve.history import shift_to


def test_a_compressed_day_keeps_every_request_and_its_length():
    workload = build_workload(2, alpha=0.5, total_rate_rps=0.5, seed=3)
    compression = Compression(factor=60.0, anchor_trace_s=7 * DAY_S, anchor_live_s=1_000_000.0)
    assert compression.live(6 * DAY_S) == pytest.approx(1_000_000.0 - 1440.0)
    timing = RequestTiming(prefill_s_per_token=0.0, decode_s_per_token=0.01)
    first_live_s = 1_000_000.0 - 1440.0
    windows = history_windows(workload, [0, 1], compression, first_live_s, 144, 10.0, timing)
    for m, loads in enumerate(windows):
        assert [w.window_start_s for w in loads[:2]] == [first_live_s, first_live_s + 10.0] and len(loads) == 144
        requests = workload.model_arrivals(m, 6 * DAY_S, 7 * DAY_S)
        busy_s = float(np.sum(timing.durations(requests.prompt_tokens, requests.output_tokens)))
        # request-seconds in the windows = the requests' own durations (only the last ones spill over)
        assert sum(w.avg for w in loads) * 10.0 == pytest.approx(busy_s, rel=0.02)


def test_shift_to_now_moves_whole_windows():
    history = {"a": [WindowLoad(window_start_s=100.0, avg=1, peak=1), WindowLoad(window_start_s=110.0, avg=2, peak=2)]}
    shifted = shift_to(history, end_s=1000.0, window_s=10.0)
    assert [w.window_start_s for w in shifted["a"]] == [980.0, 990.0]
