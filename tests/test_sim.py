"""Simulator tests: timing arithmetic, event ordering, request conservation, determinism, each
baseline's basic behaviour, and the WarmServe adapter driving the real placer core."""

from __future__ import annotations

import numpy as np
import pytest

from sim.cluster import Cluster, OverCommit
from sim.engine import EventLoop
from sim.metrics import summarize
from sim.run import DEFAULTS, make_system, model_kinds, run, timing_for
from sim.serving import Requests, Serving
from sim.systems.base import aligned_groups
from sim.timing import PAGE_BYTES, apply_measured, load_profile, pages

PROFILE = load_profile()
SMALL = {**DEFAULTS, "models": {"llama2-7b": 3, "llama2-13b": 1}, "nodes": 1, "gpus_per_node": 4,
         "total_rate_rps": 2.0, "replay_h": 0.1, "warmup_s": 300.0, "drain_s": 300.0, "history_days": 1}


# ---------------------------------------------------------------- timing model


@pytest.mark.parametrize("kind, prompt, expected_s", [
    ("llama2-7b", 0, 0.008),
    ("llama2-7b", 1000, 0.008 + 1000 * 0.0000273),
    ("llama2-70b", 2000, 0.008 + 2000 * 0.0000698),
])
def test_prefill_time(kind, prompt, expected_s):
    assert PROFILE.models[kind].prefill_s(prompt) == pytest.approx(expected_s)


def test_decode_step_grows_with_batch():
    m = PROFILE.models["llama2-7b"]
    assert m.decode_step_s(1) == pytest.approx(0.0067)
    assert m.decode_step_s(11) == pytest.approx(0.0067 * 1.3)


def test_weights_split_over_tp_in_pages():
    m = PROFILE.models["llama2-70b"]
    assert m.bytes_per_gpu % PAGE_BYTES == 0
    assert m.size_bytes / 4 <= m.bytes_per_gpu < m.size_bytes / 4 + PAGE_BYTES
    assert PROFILE.host_load_s("llama2-70b") == pytest.approx(m.bytes_per_gpu / 32e9)
    assert pages(1) == PAGE_BYTES and pages(PAGE_BYTES) == PAGE_BYTES


def test_measured_figures_override_and_typos_fail():
    measured = apply_measured(PROFILE, {"gpu": {"promote_s": 0.05}, "models": {"llama2-7b": {"decode_s_per_token": 0.01}}})
    assert measured.gpu.promote_s == 0.05 and measured.models["llama2-7b"].decode_s_per_token == 0.01
    assert measured.models["llama2-13b"] == PROFILE.models["llama2-13b"]
    with pytest.raises(TypeError):
        apply_measured(PROFILE, {"gpu": {"promote_seconds": 0.05}})


def test_measured_figures_add_a_model_kind_only_with_every_field():
    """`bench agent` measures demo models the cited profile lacks (sim/measured/cpu_agent.json)."""
    shipped = timing_for({**DEFAULTS, "measured": "cpu_agent"})
    demo = shipped.models["demo-small-a"]
    assert demo.size_bytes > 0 and demo.decode_s_per_token > 0 and shipped.models["llama2-7b"] == PROFILE.models["llama2-7b"]
    with pytest.raises(TypeError):
        apply_measured(PROFILE, {"models": {"new-kind": {"decode_s_per_token": 0.01}}})


def test_a_config_names_measured_figures_shipped_in_sim_measured_or_gives_a_path(tmp_path):
    shipped = timing_for({**DEFAULTS, "measured": "h100_agent_load"})
    assert shipped.gpu.host_to_gpu_bytes_s == 8e9 and shipped.models == PROFILE.models
    assert shipped.host_load_s("llama2-70b") == pytest.approx(4 * PROFILE.host_load_s("llama2-70b"))
    own = tmp_path / "mine.json"
    own.write_text('{"gpu": {"promote_s": 0.1}}')
    assert timing_for({**DEFAULTS, "measured": str(own)}).gpu.promote_s == 0.1
    assert timing_for(DEFAULTS) == PROFILE


# ---------------------------------------------------------------- engine and cluster


def test_events_run_in_time_order_and_arrivals_after_ties():
    loop, seen = EventLoop(), []
    loop.at(2.0, seen.append, "event@2")
    loop.at(1.0, seen.append, "event@1")
    loop.run(np.array([1.0, 3.0]), lambda i: seen.append(f"arrival{i}"), until_s=10.0)
    assert seen == ["event@1", "arrival0", "event@2", "arrival1"]


def _cluster(gpus=4, record=False):
    loop = EventLoop()
    return loop, Cluster(loop, PROFILE, 1, gpus, {"a": "llama2-7b", "b": "llama2-13b"}, record_timeline=record)


def test_cold_start_time_is_ssd_then_engine_start_and_cache_makes_reload_faster():
    loop, cluster = _cluster()
    first = cluster.cold_start("a", 0, (0,), "a#1", 0, 32)
    ssd = PROFILE.models["llama2-7b"].size_bytes / PROFILE.gpu.ssd_bytes_s
    assert first.ready_at == pytest.approx(ssd + PROFILE.gpu.engine_start_s)
    copy = cluster.prewarm("a", 0, (1,))
    assert copy.ready_at == pytest.approx(PROFILE.host_load_s("llama2-7b"))  # host-memory cache hit
    assert cluster.bytes_loaded == 2 * PROFILE.models["llama2-7b"].size_bytes


def test_a_cold_start_into_a_running_worker_skips_the_engine_start():
    loop, cluster = _cluster()
    fresh = cluster.cold_start("a", 0, (0,), "a#1", 0, 32)  # SSD, then a new engine
    in_worker = cluster.cold_start("a", 0, (1,), "a#2", 0, 32, engine="worker")  # host cache, then the worker
    assert in_worker.ready_at == pytest.approx(PROFILE.host_load_s("llama2-7b") + PROFILE.gpu.worker_start_s)
    assert PROFILE.gpu.worker_start_s < PROFILE.gpu.engine_start_s and in_worker.ready_at < fresh.ready_at


def test_an_eager_engine_started_ahead_costs_less_than_a_fresh_engine_and_unknown_kinds_fail():
    loop, cluster = _cluster()
    eager = cluster.cold_start("a", 0, (0,), "a#1", 0, 32, engine="eager_engine")
    ssd = PROFILE.models["llama2-7b"].size_bytes / PROFILE.gpu.ssd_bytes_s
    assert eager.ready_at == pytest.approx(ssd + PROFILE.gpu.eager_engine_start_s)
    assert PROFILE.gpu.worker_start_s < PROFILE.gpu.eager_engine_start_s < PROFILE.gpu.engine_start_s
    with pytest.raises(KeyError):
        cluster.cold_start("a", 0, (1,), "a#2", 0, 32, engine="warm")


def test_promotion_of_a_ready_copy_counts_a_hit_and_takes_promote_time():
    loop, cluster = _cluster()
    copy = cluster.prewarm("a", 0, (0,))
    loop.run(np.zeros(0), lambda i: None, until_s=100.0)
    inst = cluster.promote(copy, "a#1", 1 << 30, 32)
    assert inst.ready_at == pytest.approx(100.0 + PROFILE.gpu.promote_s)
    assert cluster.starts == {"hit": 1, "loading": 0, "miss": 0}


def test_memory_is_never_over_committed():
    _, cluster = _cluster()
    cluster.prewarm("b", 0, (0, 1))
    with pytest.raises(OverCommit):
        cluster.cold_start("a", 0, (0,), "a#1", PROFILE.gpu.usable_bytes, 32)


def test_demote_keeps_weights_as_a_ready_copy_and_books_gpu_seconds():
    loop, cluster = _cluster(record=True)
    inst = cluster.cold_start("a", 0, (0,), "a#1", 1 << 30, 32)
    loop.at(50.0, cluster.retire, inst, "demote")
    loop.run(np.zeros(0), lambda i: None, until_s=100.0)
    [copy] = cluster.gpus[0][0].copies
    assert copy.state == "ready" and not cluster.instances
    assert cluster.gpu_seconds == pytest.approx(50.0 + PROFILE.gpu.demote_s)
    assert [state for _, _, _, state in cluster.timeline][-1] == 1  # prewarmed


def test_aligned_groups_nest():
    assert aligned_groups(8, 4) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert aligned_groups(8, 2)[1] == (2, 3)


def test_model_kinds_interleave_the_mix():
    kinds = model_kinds({"x": 2, "y": 1})
    assert sorted(kinds) == ["x", "x", "y"] and kinds[0] == "x"


# ---------------------------------------------------------------- serving


def test_requests_queue_until_an_instance_is_ready_then_get_ttft_from_prefill():
    loop, cluster = _cluster()
    req = Requests(np.array([0.0, 0.5]), np.array([0, 0]), np.array([100, 100]), np.array([10, 10]))
    serving = Serving(loop, cluster, req, ["a", "b"])
    waited = []
    serving.on_waiting = waited.append
    inst = cluster.cold_start("a", 0, (0,), "a#1", 8 << 30, 32)
    loop.run(req.arrival_s, serving.arrive, until_s=100.0)
    prefill = PROFILE.models["llama2-7b"].prefill_s(100)
    assert waited == [0, 0]
    assert req.first_token_s[0] == pytest.approx(inst.ready_at + prefill)
    assert req.first_token_s[1] == pytest.approx(inst.ready_at + 2 * prefill)  # prefills are serialised
    assert not np.isnan(req.finish_s).any() and inst.inflight == 0


def test_unfinished_requests_are_counted_not_dropped():
    loop, cluster = _cluster()
    req = Requests(np.array([1.0, 2.0]), np.array([0, 1]), np.array([10, 10]), np.array([5, 5]))
    serving = Serving(loop, cluster, req, ["a", "b"])
    cluster.cold_start("a", 0, (0,), "a#1", 8 << 30, 32)
    loop.run(req.arrival_s, serving.arrive, until_s=100.0)
    summary = summarize(req, cluster, 100.0, np.ones(2, bool))
    assert summary["finished"] + summary["unfinished"] == summary["requests"] == 2
    assert summary["unfinished"] == 1 and summary["ttft_p99_s"] == "inf"


# ---------------------------------------------------------------- whole runs (small scenario)


@pytest.fixture(scope="module")
def small_runs():
    return {name: run(SMALL, make_system(name, SMALL))
            for name in ("serverlessllm", "serverlessllm-eager-engine", "muxserve", "warmserve-paper")}


def test_conservation_in_every_system(small_runs):
    for result in small_runs.values():
        s = result.summary
        assert s["requests"] > 50
        assert s["finished"] + s["unfinished"] == s["requests"] == len(result.ttft_s)


def test_same_seed_same_result():
    again = run(SMALL, make_system("warmserve-paper", SMALL))
    once = run(SMALL, make_system("warmserve-paper", SMALL))
    assert again.summary == once.summary
    assert np.array_equal(again.ttft_s, once.ttft_s)


def test_serverless_only_cold_starts_and_muxserve_never_starts(small_runs):
    sllm, mux = small_runs["serverlessllm"].summary, small_runs["muxserve"].summary
    assert sllm["instance_starts"]["miss"] > 0 and sllm["prewarm_hit_rate"] == 0
    assert sum(mux["instance_starts"].values()) == 0 and mux["prewarm_hit_rate"] is None
    assert mux["gpu_share"] == pytest.approx(1.0)  # static: every GPU serves all the time


def test_an_engine_started_ahead_shortens_serverless_cold_starts(small_runs):
    fresh, eager = small_runs["serverlessllm"].summary, small_runs["serverlessllm-eager-engine"].summary
    assert eager["instance_starts"]["miss"] > 0 and fresh["instance_starts"]["miss"] > 0
    assert float(eager["ttft_p99_s"]) < float(fresh["ttft_p99_s"]) - 10.0  # 31.3 s vs 4.4 s per engine start


def test_warmserve_drives_the_placer_core_and_hits_prewarmed_copies(small_runs):
    s = small_runs["warmserve-paper"].summary
    assert s["instance_starts"]["hit"] > 0
    assert s["bytes_loaded"] < small_runs["serverlessllm"].summary["bytes_loaded"]


def test_no_prewarm_ablation_plans_no_copies():
    """Hits remain possible (demoted instances leave their weights), but nothing is prewarmed."""
    system = make_system("paper-no-prewarm", SMALL)
    run(SMALL, system)
    kinds = {type(effect).__name__ for _, effect in system.shell.decisions}
    assert "Prewarm" not in kinds and "ColdStart" in kinds


# ---------------------------------------------------------------- grid and set-up cache


def test_grid_scales_the_mix_and_lists_the_cells():
    from sim.grid import cells, scale_mix
    mix = {"llama2-7b": 8, "llama2-13b": 4, "llama2-70b": 2}
    assert scale_mix(mix, 28) == {"llama2-7b": 16, "llama2-13b": 8, "llama2-70b": 4}
    assert sum(scale_mix(mix, 15).values()) == 15
    got = cells([14, 28], [2.0, 5.0], 0.5, [0.0, 0.5, 2.0], (14, 5.0))
    assert got[:4] == [(14, 2.0, 0.5), (14, 5.0, 0.5), (28, 2.0, 0.5), (28, 5.0, 0.5)]
    assert got[4:] == [(14, 5.0, 0.0), (14, 5.0, 2.0)]


def test_setup_cache_computes_once_per_key(tmp_path):
    from sim.cache import cached
    calls = []

    def compute():
        calls.append(1)
        return {"avg": np.arange(3.0)}

    first = cached(str(tmp_path), {"what": "history", "k": 1}, compute)
    again = cached(str(tmp_path), {"what": "history", "k": 1}, compute)
    cached(str(tmp_path), {"what": "history", "k": 2}, compute)
    cached(None, {"what": "history", "k": 1}, compute)
    assert np.array_equal(first["avg"], again["avg"]) and len(calls) == 3


# ---------------------------------------------------------------- workload demand


class _TwoRequests:
    """A workload stand-in: model 0 (TP1) gets a request at t=10, model 1 (TP4) one at t=12."""

    def model_arrivals(self, model, start_s, end_s):
        from shared.workload import Arrivals
        at = np.array([10.0 + 2 * model])
        return Arrivals(at, np.array([model]), np.array([0]), np.array([0]))


def test_gpu_demand_counts_each_active_model_once_with_its_tp():
    import dataclasses
    from sim.demand import gpu_demand
    fixed = {k: dataclasses.replace(m, prefill_overhead_s=1.0, decode_s_per_token=0.0) for k, m in PROFILE.models.items()}
    timing = dataclasses.replace(PROFILE, models=fixed)  # every request in flight 1 s, + 5 s of grace
    got = gpu_demand(_TwoRequests(), ["llama2-7b", "llama2-70b"], timing, 0.0, 20.0, gpus=4)
    assert got["mean_gpus_needed"] == pytest.approx((6 * 1 + 6 * 4) / 20)
    assert got["share_over_capacity"] == pytest.approx(4 / 20)  # t in [12, 16): 1 + 4 GPUs > 4


def test_ttft_cdf_writes_a_png_for_many_systems(tmp_path):
    from types import SimpleNamespace
    from sim.plots import ttft_cdf
    results = [SimpleNamespace(system=f"s{i}", ttft_s=np.array([0.01 * (i + 1), np.inf])) for i in range(12)]
    path = ttft_cdf(results, tmp_path / "cdf.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
