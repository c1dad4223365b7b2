"""One simulated run: a config (cluster, timing profile, workload slice) and a system in, the
metrics out. Learning days give the baselines' popularity and the forecaster's history; a warm-up
before the replay window is simulated but not measured; after it the cluster drains (no arrivals)
so every request either finishes or is counted unfinished.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.workload import DAY_S, Workload, build_workload
from sim.cluster import Cluster
from sim.engine import EventLoop
from sim.metrics import summarize, ttft_s
from sim.serving import Requests, Serving
from sim.systems.base import Context
from sim.timing import MEASURED_DIR, PROFILE_DIR, TimingProfile, apply_measured, load_profile

DEFAULTS = {
    "nodes": 2, "gpus_per_node": 8, "profile": "h100_llama2", "measured": None,
    "models": {"llama2-7b": 8, "llama2-13b": 4, "llama2-70b": 2},
    "alpha": 0.5, "total_rate_rps": 10.0, "seed": 1, "capacity": 32,
    "learn_days": 7, "replay_day": 7, "replay_start_h": 10.0, "replay_h": 1.0,
    "warmup_s": 900.0, "drain_s": 900.0, "kv_tokens_per_request": 2048,
    "keep_alive_s": 60.0, "history_days": 7, "csp_days": 3, "csp_errors": 10,
    "client_order": "rate",  # shared.workload's client rule: "rate" | "quiet" (burstiest clients first)
    "cache_dir": None,  # where slow set-up results (learning-day windows) are cached (sim/cache.py)
}


def make_system(name: str, config: dict):
    from sim.systems.muxserve import MuxServe
    from sim.systems.serverless import ENGINES as SERVERLESS_ENGINES, ServerlessLLM
    from sim.systems.warmserve import VARIANTS, WarmServe

    if name in SERVERLESS_ENGINES:
        return ServerlessLLM(config["keep_alive_s"], name)
    if name == "muxserve":
        return MuxServe()
    if name in VARIANTS:
        return WarmServe(VARIANTS[name])
    raise ValueError(f"unknown system {name!r}: {', '.join(SERVERLESS_ENGINES)}, muxserve, {', '.join(VARIANTS)}")


def load_config(path: str | Path) -> dict:
    config = dict(DEFAULTS)
    config.update(json.loads(Path(path).read_text()))
    return config


def timing_for(config: dict) -> TimingProfile:
    """The config's profile (a name in sim/profiles or a .json path), with its measured figures (a
    name in sim/measured or a .json path) applied."""
    timing = load_profile(_json_path(config["profile"], PROFILE_DIR))
    if config.get("measured"):
        timing = apply_measured(timing, json.loads(_json_path(config["measured"], MEASURED_DIR).read_text()))
    return timing


def _json_path(name: str, directory: Path) -> Path:
    return Path(name) if name.endswith(".json") else directory / f"{name}.json"


def model_kinds(mix: dict[str, int]) -> list[str]:
    """Profile kind per model index (popularity rank), interleaving the mix so every kind spans
    the popularity range: model i gets the kind furthest behind its target share."""
    total = sum(mix.values())
    kinds, given = [], {k: 0 for k in mix}
    for i in range(total):
        kind = max(mix, key=lambda k: (mix[k] * (i + 1) / total - given[k], mix[k]))
        given[kind] += 1
        kinds.append(kind)
    return kinds


def build(config: dict) -> tuple[Workload, list[str]]:
    kinds = model_kinds(config["models"])
    workload = build_workload(len(kinds), config["alpha"], config["total_rate_rps"], config["seed"],
                              order=config["client_order"])
    return workload, kinds


def replay_window(config: dict) -> tuple[float, float]:
    """[start, end) of the measured replay, seconds since midnight of trace day 0."""
    start = config["replay_day"] * DAY_S + config["replay_start_h"] * 3600.0
    return start, start + config["replay_h"] * 3600.0


@dataclass
class RunResult:
    system: str
    summary: dict
    ttft_s: np.ndarray  # measured requests' TTFT (inf: never got a first token)
    timeline: list | None  # (t, node, device, state) changes, when recorded
    replay_start_s: float
    replay_end_s: float
    spans: list | None = None  # (start, end or inf, node, devices, model) of every instance, when recorded


def run(config: dict, system, progress: bool = False, timeline: bool = False,
        prepared: tuple[Workload, list[str]] | None = None) -> RunResult:
    workload, kinds = prepared or build(config)
    timing = timing_for(config)
    start, end = replay_window(config)
    sim_start = start - config["warmup_s"]
    arrivals = workload.arrivals(sim_start, end)
    requests = Requests(arrivals.time_s, arrivals.model, arrivals.prompt_tokens, arrivals.output_tokens)
    loop = EventLoop(sim_start)
    cluster = Cluster(loop, timing, config["nodes"], config["gpus_per_node"],
                      dict(zip(workload.models, kinds)), record_timeline=timeline)
    serving = Serving(loop, cluster, requests, workload.models)
    learn = slice(0, int(config["learn_days"] * DAY_S // 600))
    ctx = Context(loop, cluster, serving, requests, workload.models, config["capacity"],
                  workload.rate_rps[:, learn].mean(axis=1).tolist(), start, end, config, workload)
    cluster.books = (start, end)
    system.start(ctx)
    loop.run(requests.arrival_s, serving.arrive, end + config["drain_s"], progress=progress)
    cluster.close_books()
    measured = requests.arrival_s >= start
    summary = summarize(requests, cluster, end - start, measured)
    return RunResult(system.name, summary, ttft_s(requests)[measured], cluster.timeline, start, end,
                     cluster.spans())
