"""The live benchmark, shorter: `warmserve bench live --engine fake` (fake engines in worker processes)
runs `warmserve up` plus a second agent process, 12 models on 2x2 devices that cannot hold them all,
the learn days imported, 10 s of a compressed ServeGen slice through the gateway; every request is
accounted for, every instance start says what it found, and the simulator's twin and the oracle
stand beside it in the JSON, the plots and the events files. The simulator side alone is fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import live_sim
from bench.live import (START_KINDS, CappedTiming, Config, device_timeline, instance_spans, main, make_stack, model_infos,
                        workload_of)
from services.placer.adapter import core_config
from sim.cluster import EMPTY, LOADING, PREWARMED, SERVING, STARTING
from sim.systems import warmserve

FIGURES = {"requests", "ok", "unfinished", "ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "wait_p50_s", "wait_p95_s",
           "wait_p99_s", "starts", "bytes_loaded", "device_seconds"}


def models_dir_of(demo_models) -> str:
    return str(Path(next(iter(demo_models.values())).path).parent)


@pytest.mark.slow
def test_a_short_replay_stands_beside_its_simulation(demo_models, tmp_path, capsys):
    models_dir = models_dir_of(demo_models)
    assert main(["--engine", "fake", "--systems", "ours,oracle", "--replay-s", "10", "--models-dir", models_dir,
                 "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    live, sim = result["systems"], result["sim"]
    assert list(live) == ["ours"] and list(sim) == ["ours", "oracle"]  # the oracle is simulated only
    run = live["ours"]
    assert run["requests"] > 10 and run["ok"] + run["unfinished"] == run["requests"]
    assert run["unfinished"] == 0, run["errors"]
    assert set(run["starts"]) == set(START_KINDS) and sum(run["starts"].values()) > 0
    assert run["other_starts"] == 0 and run["bytes_loaded"] > 0 and run["device_seconds"] > 0
    assert run["ttft_p99_s"] is not None and run["wait_p50_s"] <= run["ttft_p50_s"]
    for name, figures in sim.items():
        assert FIGURES <= set(figures) and set(figures["starts"]) == set(START_KINDS), name
        assert figures["requests"] == run["requests"] and figures["unfinished"] == 0, name
    assert sim["oracle"]["wait_p99_s"] == 0.0 and sim["oracle"]["ttft_p99_s"] <= sim["ours"]["ttft_p99_s"]
    files = {Path(f).name for f in result["files"]}
    assert {"ttft-cdf.png", "devices-ours-live.png", "devices-ours-sim.png", "events-ours.jsonl",
            "requests-ours.jsonl"} <= files
    assert all(Path(f).stat().st_size > 0 for f in result["files"])
    assert json.loads((tmp_path / "result.json").read_text())["sim"] == sim


def test_the_simulated_systems_run_the_live_placer_configuration(demo_models, tmp_path):
    config = Config(engine="fake", replay_live_s=20.0)
    models_dir = models_dir_of(demo_models)
    infos = model_infos(config, models_dir)
    for name in ("ours", "paper", "reactive", "serverlessllm"):
        settings = make_stack(name, config, models_dir, tmp_path).settings
        variant = live_sim.variant(name, settings)
        cfg = {"score_bandwidth_bytes_s": settings.load_bandwidth_bytes_s}
        assert warmserve.core_config(variant, settings.max_inflight_per_instance, cfg) == core_config(settings), name
        assert variant.universal_workers == settings.warm_engines and variant.window_s == config.window_s
        summary, result = live_sim.simulate(name, config, infos, settings, workload_of(config), CappedTiming(config))
        assert summary["unfinished"] == 0 and summary["requests"] == len(result.ttft_s) > 0, name
        assert result.timeline and result.spans and {s[4] for s in result.spans} <= {i.name for i in infos}, name
    oracle, _ = live_sim.simulate("oracle", config, infos, make_stack("oracle", config, models_dir, tmp_path).settings,
                                  workload_of(config), CappedTiming(config))
    assert (oracle["wait_p99_s"], oracle["bytes_loaded"], oracle["unfinished"]) == (0.0, 0, 0)
    assert oracle["requests"] == summary["requests"] and oracle["ttft_p99_s"] <= summary["ttft_p99_s"]


def test_the_device_timeline_follows_copies_and_instances():
    def event(at, name, device=0, model="m", instance=""):
        return {"at_s": at, "name": name, "node": "node1", "devices": [device], "model": model, "instance_id": instance}

    events = [event(1, "prewarm_started"), event(2, "prewarm_finished"), event(3, "instance_starting", instance="i"),
              event(4, "instance_ready", instance="i"), event(5, "instance_stopped", instance="i"),
              event(6, "evicted"), {"at_s": 7, "name": "plan_changed", "node": "", "devices": [], "model": "",
                                    "instance_id": ""}]
    assert device_timeline(events) == [(1, 1, 0, LOADING), (2, 1, 0, PREWARMED), (3, 1, 0, STARTING),
                                       (4, 1, 0, SERVING), (5, 1, 0, PREWARMED), (6, 1, 0, EMPTY)]
    assert instance_spans(events) == [(3, 5, 1, (0,), "m")]
