"""The live benchmark, shorter (bench.live with the fake engine in worker processes): `warmserve up`
plus a second agent process, 12 models on 2x2 devices that cannot hold them all, the learn days
imported into the forecaster, 10 s of a compressed ServeGen slice through the gateway; every
request is accounted for and every instance start says what it found."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.live import START_KINDS, Config, model_infos, run_system

pytestmark = pytest.mark.slow


async def test_a_short_replay_is_fully_accounted_for(demo_models):
    models_dir = str(Path(next(iter(demo_models.values())).path).parent)
    config = Config(engine="fake", replay_live_s=10.0, drain_s=60.0)
    result = await run_system("ours", config, model_infos(config, models_dir), models_dir, print)
    assert result["requests"] > 10 and result["ok"] + result["unfinished"] == result["requests"]
    assert result["unfinished"] == 0, result["errors"]
    assert set(result["starts"]) == set(START_KINDS) and sum(result["starts"].values()) > 0
    assert result["other_starts"] == 0 and result["bytes_loaded"] > 0 and result["device_seconds"] > 0
    assert result["ttft_p99_s"] is not None and result["wait_p50_s"] <= result["ttft_p50_s"]
